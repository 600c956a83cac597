"""docs/adding_a_model.md, followed literally: the ```python example blocks of its out-of-tree toy VLM
are run as written (config, processor, model, registration, checkpoint, `LLM(model=dir)` + generate),
then the engine's output is checked against a direct torch computation of the same network on the
same weights. The doc's registrations are undone after this module, so no other test sees them."""
import json
import os
import re
import shutil
import sys
import tempfile
import types

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from vlmserve import LLM, SamplingParams
from vlmserve.models.registry import ModelRegistry

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "adding_a_model.md")
ARCH = "ToyVLMForConditionalGeneration"
TOL = 1e-4


def doc_example_code() -> str:
    with open(DOC) as f:
        blocks = re.findall(r"^```python example\n(.*?)^```", f.read(), re.S | re.M)
    assert len(blocks) == 4, "the doc's example is four ```python example blocks"
    return "\n\n".join(blocks)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The doc's example run in a fresh module; its checkpoint lands in a pytest temp dir."""
    mod = types.ModuleType("toy_vlm_from_doc")
    with pytest.MonkeyPatch.context() as mp:
        # Global registries: work on copies, restored when the module's tests are done.
        mp.setattr(ModelRegistry, "_custom", dict(ModelRegistry._custom))
        mp.setattr(CONFIG_MAPPING, "_extra_content", dict(CONFIG_MAPPING._extra_content))
        mp.setitem(sys.modules, mod.__name__, mod)
        assert ARCH not in ModelRegistry.supported_architectures()
        with pytest.MonkeyPatch.context() as tmp:
            tmp.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("doc_example")))
            exec(compile(doc_example_code(), DOC, "exec"), mod.__dict__)
        yield mod
    assert ARCH not in ModelRegistry.supported_architectures()
    assert "toy_vlm" not in CONFIG_MAPPING


@pytest.fixture(scope="module")
def llm(toy):
    return toy.llm  # the doc's own LLM(model=model_dir, dtype="float32"): default limit of 1 image


@pytest.fixture(scope="module")
def v5_llm(toy, tmp_path_factory):
    """The same weights under the names a transformers-5 save would use, allowing 2 images a prompt."""
    d = str(tmp_path_factory.mktemp("toy_vlm_v5"))
    shutil.copytree(toy.model_dir, d, dirs_exist_ok=True)
    back = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
            ("vision.", "model.vision.")]
    state = {}
    for k, v in load_file(os.path.join(toy.model_dir, "model.safetensors")).items():
        old, new = next((o, n) for o, n in back if k.startswith(o))
        state[new + k[len(old):]] = v
    save_file(state, os.path.join(d, "model.safetensors"))
    return LLM(model=d, dtype="float32", limit_mm_per_prompt={"image": 2})


def rand_image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


class Reference:
    """The toy network computed directly from model.safetensors: the image encoder in plain torch
    ops, the language model through HF transformers' LlamaForCausalLM."""

    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        self.size, self.patch, self.pool = cfg["image_size"], cfg["patch_size"], cfg["pool_size"]
        self.image_token = cfg["image_token_index"]
        w = load_file(os.path.join(model_dir, "model.safetensors"))
        self.w = w
        self.lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg["text_config"])).eval()
        self.lm.load_state_dict({k[len("language_model."):]: v for k, v in w.items()
                                 if k.startswith("language_model.")})
        self.vocab = cfg["text_config"]["vocab_size"]

    def encode(self, img) -> torch.Tensor:
        """One image -> [tokens, hidden]."""
        img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        x = np.asarray(img.convert("RGB").resize((self.size, self.size), Image.BILINEAR), np.float32) / 255.0
        s, p, k = self.size, self.patch, self.pool
        g = s // p
        x = torch.from_numpy(x).reshape(g, p, g, p, 3).permute(0, 2, 4, 1, 3).reshape(g, g, 3 * p * p)
        w = self.w
        h = torch.nn.functional.gelu(x @ w["vision.patch_embed.weight"].T + w["vision.patch_embed.bias"])
        h = h.reshape(g // k, k, g // k, k, -1).mean(dim=(1, 3)).reshape((g // k) ** 2, -1)
        return h @ w["vision.projector.weight"].T + w["vision.projector.bias"]

    @torch.no_grad()
    def logprobs(self, ids, images=(), embeds=None) -> torch.Tensor:
        ids = torch.tensor(ids)
        at = ids == self.image_token
        x = self.lm.model.embed_tokens(ids.masked_fill(at, 0))
        feats = embeds if embeds is not None else [self.encode(im) for im in images]
        x[at] = torch.cat(list(feats)) if len(feats) else x[at]
        return torch.log_softmax(self.lm(inputs_embeds=x[None]).logits[0].float(), dim=-1)


@pytest.fixture(scope="module")
def ref(toy):
    return Reference(toy.model_dir)


def all_logprobs(ref):
    return SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=ref.vocab,
                          prompt_logprobs=ref.vocab)


def assert_matches(ref_lp, out):
    """Every logprob of the whole vocabulary, at every prompt and output position, within TOL."""
    P = len(out.prompt_token_ids)
    rows = [(i, out.prompt_logprobs[i]) for i in range(1, P)]
    rows += [(P + j, lp) for j, lp in enumerate(out.outputs[0].logprobs)]
    assert out.prompt_logprobs[0] is None and len(rows) == P - 1 + len(out.outputs[0].token_ids)
    worst = 0.0
    for pos, lp in rows:
        assert len(lp) == ref_lp.shape[1]
        ours = torch.tensor([lp[t].logprob for t in range(ref_lp.shape[1])])
        worst = max(worst, (ours - ref_lp[pos - 1]).abs().max().item())
    assert worst <= TOL, f"logprobs differ from the direct computation by up to {worst}"
    for j, t in enumerate(out.outputs[0].token_ids):  # greedy: the reference's best token
        row = ref_lp[P - 1 + j]
        assert row[t] >= row.max() - TOL


# ---- the doc's example as written --------------------------------------------------------
def test_the_doc_checkpoint_and_registration(toy, llm):
    d = toy.model_dir
    assert "doc_example" in d  # made by tempfile.mkdtemp, inside pytest's temp dir
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [ARCH] and cfg["model_type"] == "toy_vlm"
    assert os.path.isfile(os.path.join(d, "model.safetensors"))
    tok = llm.get_tokenizer()
    assert tok("<image>", add_special_tokens=False).input_ids == [cfg["image_token_index"]]
    assert cfg["image_token_index"] < cfg["text_config"]["vocab_size"]

    assert ModelRegistry.resolve(ARCH) is toy.ToyVLMForConditionalGeneration
    engine = llm.llm_engine
    assert isinstance(engine.runner.model, toy.ToyVLMForConditionalGeneration)
    assert isinstance(engine.mm_processor, toy.ToyVLMProcessor)
    assert engine.mm_processor.placeholder_text("image") == toy.ToyVLMForConditionalGeneration.placeholder_str("image", 0)


def test_the_doc_usage_generates(toy):
    out, proc = toy.out, toy.llm.llm_engine.mm_processor
    assert 1 <= len(out.outputs[0].token_ids) <= 8 and out.finished
    n = proc.max_tokens_per_item("image")
    assert n == toy.tokens_per_image(toy.llm.llm_engine.model_config.hf_config) == 16
    ids, image_token = out.prompt_token_ids, proc.placeholder_token_id("image")
    assert ids.count(image_token) == n
    first = ids.index(image_token)
    assert ids[first:first + n] == [image_token] * n  # one run, where <image> was


# ---- behaviour ---------------------------------------------------------------------------
def test_logits_equal_a_direct_computation(llm, ref):
    prompts = [{"prompt": "What is in <image> this picture?", "multi_modal_data": {"image": rand_image(64, 48, 1)}},
               {"prompt": "<image>\ndescribe the shape", "multi_modal_data": {"image": rand_image(20, 90, 2)}},
               {"prompt": "the cat <image> runs", "multi_modal_data": {"image": np.asarray(rand_image(40, 40, 3))}},
               "a text-only prompt in the same batch"]
    outs = llm.generate(prompts, all_logprobs(ref), use_tqdm=False)
    for p, out in zip(prompts, outs):
        images = [p["multi_modal_data"]["image"]] if isinstance(p, dict) else []
        assert_matches(ref.logprobs(out.prompt_token_ids + out.outputs[0].token_ids, images), out)


def test_a_different_image_changes_the_logprobs(llm, ref):
    prompt = "What is in <image> this picture?"
    a, b = rand_image(64, 48, 11), rand_image(64, 48, 12)
    outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": im}} for im in (a, b, np.asarray(a))],
                        SamplingParams(temperature=0.0, max_tokens=1, logprobs=ref.vocab), use_tqdm=False)
    lp = [torch.tensor([o.outputs[0].logprobs[0][t].logprob for t in range(ref.vocab)]) for o in outs]
    assert (lp[0] - lp[1]).abs().max() > 1e-2
    assert (lp[0] - lp[2]).abs().max() < 1e-6  # the same pixels as a numpy array


def test_image_embeddings_in_place_of_pixels(llm, ref):
    img = rand_image(50, 30, 21)
    emb = ref.encode(img)
    assert emb.shape == (16, 64)
    prompt = "look <image> here"
    by_pixels, by_embeds = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": img}},
                                         {"prompt": prompt, "multi_modal_data": {"image": emb}}],
                                        all_logprobs(ref), use_tqdm=False)
    assert by_embeds.outputs[0].token_ids == by_pixels.outputs[0].token_ids
    assert_matches(ref.logprobs(by_embeds.prompt_token_ids + by_embeds.outputs[0].token_ids, embeds=[emb]),
                   by_embeds)


def test_other_key_layout_and_two_images(llm, v5_llm, ref):
    a, b = rand_image(64, 48, 31), rand_image(48, 64, 32)
    one = {"prompt": "What is in <image> this picture?", "multi_modal_data": {"image": a}}
    ours, theirs = llm.generate(one, all_logprobs(ref), use_tqdm=False)[0], \
        v5_llm.generate(one, all_logprobs(ref), use_tqdm=False)[0]
    assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
    assert ours.outputs[0].logprobs[0][ours.outputs[0].token_ids[0]].logprob == pytest.approx(
        theirs.outputs[0].logprobs[0][ours.outputs[0].token_ids[0]].logprob, abs=1e-6)
    two = [{"prompt": "<image> first, then <image>", "multi_modal_data": {"image": ims}} for ims in ([a, b], [b, a])]
    outs = v5_llm.generate(two, all_logprobs(ref), use_tqdm=False)
    for p, out in zip(two, outs):
        assert out.prompt_token_ids.count(ref.image_token) == 2 * 16
        assert_matches(ref.logprobs(out.prompt_token_ids + out.outputs[0].token_ids, p["multi_modal_data"]["image"]),
                       out)
    assert outs[0].outputs[0].logprobs[0] != outs[1].outputs[0].logprobs[0]  # order matters


def test_too_many_images(llm):
    imgs = [rand_image(32, 32, 1), rand_image(32, 32, 2)]
    with pytest.raises(ValueError, match="2 images in one prompt, more than the limit of 1"):
        llm.generate({"prompt": "<image> and <image>", "multi_modal_data": {"image": imgs}}, use_tqdm=False)
    # the engine is unharmed
    assert llm.generate({"prompt": "<image>", "multi_modal_data": {"image": imgs[0]}},
                        SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


# ---- the same model served through a plugin --------------------------------------------------------
def install_as_plugin(toy_dir) -> str:
    """The doc's model module plus the package metadata an installed package would have: a
    `vlmserve.plugins` entry point. Returns the directory to put on PYTHONPATH."""
    blocks = re.findall(r"^```python example\n(.*?)^```", open(DOC).read(), re.S | re.M)
    (toy_dir / "toy_vlm.py").write_text("\n\n".join(blocks[:3]) + "\n\ndef register():\n    pass\n")
    meta = toy_dir / "toy_vlm-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-vlm\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text("[vlmserve.plugins]\ntoy_vlm = toy_vlm:register\n")
    return str(toy_dir)


def plugin_env(path: str, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1", **extra}


def test_vlmserve_serve_loads_the_model_through_its_plugin(toy, llm, tmp_path):
    import subprocess
    import time

    import httpx
    import openai

    path = install_as_plugin(tmp_path)
    probe = "from vlmserve.plugins import load_plugins; print(load_plugins())"
    for env, want in (({}, "['toy_vlm']"), ({"VLMSERVE_PLUGINS": ""}, "[]")):
        out = subprocess.run([sys.executable, "-c", probe], env=plugin_env(path, **env),
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == want, out.stderr[-2000:]

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vlmserve.entrypoints.cli", "serve", toy.model_dir,
                             "--port", str(port), "--dtype", "float32"],
                            stdout=log, stderr=subprocess.STDOUT, env=plugin_env(path))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not start"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        served = client.completions.create(model=client.models.list().data[0].id, prompt="a b c",
                                           max_tokens=6, temperature=0)
        offline = llm.generate(["a b c"], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
        assert served.choices[0].text == offline[0].outputs[0].text
        assert served.usage.completion_tokens == len(offline[0].outputs[0].token_ids)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_register_and_unregister_an_architecture():
    class Stand(torch.nn.Module):
        pass

    name = "StandInForCausalLM"
    assert name not in ModelRegistry.supported_architectures()
    ModelRegistry.register_model(name, Stand)
    assert ModelRegistry.resolve(name) is Stand and name in ModelRegistry.supported_architectures()
    ModelRegistry.unregister_model(name)
    assert name not in ModelRegistry.supported_architectures()
    with pytest.raises(KeyError, match="not registered"):
        ModelRegistry.unregister_model(name)


def test_chat_placeholders_are_what_the_model_declares(llm, toy):
    engine = llm.llm_engine
    assert engine.placeholder_str("image", 0) == toy.ToyVLMForConditionalGeneration.placeholder_str("image", 0)
