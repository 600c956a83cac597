"""Bad input raises an error that names the problem."""
import json
import os
import shutil

import pytest

from vlmserve import LLM, SamplingParams
from vlmserve.config import ModelLoadError


@pytest.fixture(scope="module")
def llm(text_model_dir):
    return LLM(text_model_dir("llama_tied"), dtype="float32", max_model_len=64)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", use_tqdm=False)


def test_prompt_over_max_model_len(llm):
    with pytest.raises(ValueError, match=r"70 tokens.*max_model_len=64"):
        llm.generate({"prompt_token_ids": [5] * 70}, use_tqdm=False)


def test_token_ids_outside_vocabulary(llm):
    with pytest.raises(ValueError, match="out of the vocabulary"):
        llm.generate({"prompt_token_ids": [1, 10**6]}, use_tqdm=False)


def test_bad_prompt_in_batch_fails_before_anything_runs(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["the cat", {"prompt_token_ids": []}], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate("the cat", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-5), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n must be"), (dict(min_p=2), "min_p"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(logprobs=-1), "logprobs"),
    (dict(stop=[""]), "stop strings"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_unknown_architecture(text_model_dir, tmp_path):
    d = _copy(text_model_dir("llama_tied"), tmp_path / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["architectures"] = ["FancyNewForCausalLM"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'FancyNewForCausalLM'"):
        LLM(d)


def test_malformed_config(text_model_dir, tmp_path):
    d = _copy(text_model_dir("llama_tied"), tmp_path / "m")
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        LLM(d)


def test_missing_weights(text_model_dir, tmp_path):
    d = _copy(text_model_dir("llama_tied"), tmp_path / "m")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        LLM(d)


def test_truncated_weights(text_model_dir, tmp_path):
    d = _copy(text_model_dir("llama_tied"), tmp_path / "m")
    path = os.path.join(d, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        LLM(d)


def test_weights_that_do_not_match_config(text_model_dir, tmp_path):
    d = _copy(text_model_dir("llama_tied"), tmp_path / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ModelLoadError, match="shape"):
        LLM(d)


def test_checkpoint_missing_a_shard(text_model_dir, tmp_path):
    d = _copy(text_model_dir("llama"), tmp_path / "m")  # 3 shards with an index
    os.remove(os.path.join(d, "model-00002-of-00003.safetensors"))
    with pytest.raises(ModelLoadError, match="missing"):
        LLM(d)


def test_kv_cache_smaller_than_max_model_len(text_model_dir):
    with pytest.raises(ValueError, match="KV cache holds 32 tokens"):
        LLM(text_model_dir("llama_tied"), max_model_len=64, block_size=16, num_kv_blocks=2)
