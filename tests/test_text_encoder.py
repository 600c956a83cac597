"""The engine's text encoder gives the token ids of the tokenizer's own call, by its shortcut where it
takes one and by the call otherwise."""
import pytest
from transformers import AutoTokenizer

from vlmserve.engine.text_encoder import text_encoder

TEXTS = ["<image>\nDescribe the picture.", "", " leading and  double  spaces ", "naïve café – 東京 🙂",
         "</s><s> special tokens inside", "<image><image>\n12345 67.89e-3", "line\n\n\tbreaks\r\n"]


@pytest.fixture(scope="module", params=["llava", "llama", "qwen2"])
def tokenizer(request, llava_dir, text_model_dir):
    path = llava_dir if request.param == "llava" else text_model_dir(request.param)
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_shortcut_gives_the_call_ids(tokenizer, add_special_tokens):
    encode = text_encoder(tokenizer)
    assert encode.__name__ == "encode"  # the shortcut, not the tokenizer's call
    backend = tokenizer.backend_tokenizer
    for text in TEXTS:
        want = tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        assert encode(text, add_special_tokens=add_special_tokens) == want, text
        assert backend.encode(text, add_special_tokens=add_special_tokens).ids == want, text


def test_settings_on_the_backend_take_the_call(tokenizer):
    """Truncation or special-token splitting set on the tokenizer: the call, whose ids differ."""
    encode = text_encoder(tokenizer)
    text = TEXTS[0] * 20
    tokenizer.backend_tokenizer.enable_truncation(max_length=8)
    try:
        assert encode(text) == tokenizer(text).input_ids
    finally:
        tokenizer.backend_tokenizer.no_truncation()
    tokenizer.split_special_tokens = True
    try:
        assert encode(TEXTS[4]) == tokenizer(TEXTS[4]).input_ids
        assert tokenizer(TEXTS[4]).input_ids != tokenizer(TEXTS[4], split_special_tokens=False).input_ids
    finally:
        tokenizer.split_special_tokens = False
        tokenizer(TEXTS[4])  # puts the backend's flag back


def test_subclass_with_its_own_call_is_not_bypassed(llava_dir):
    base = type(AutoTokenizer.from_pretrained(llava_dir))

    class Shouting(base):
        def __call__(self, text, **kw):
            return super().__call__(text.upper(), **kw)

    tok = Shouting.from_pretrained(llava_dir)
    assert text_encoder(tok).__name__ == "call"
    assert text_encoder(tok)("describe it") == tok("describe it").input_ids != tok.backend_tokenizer.encode(
        "describe it").ids
