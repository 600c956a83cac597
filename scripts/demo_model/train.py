"""Train the built-in ``vlmserve-demo`` model (a tiny LLaVA) on synthetic shapes.

    nice -n 10 python scripts/demo_model/train.py            # -> vlmserve/demo_model/
    nice -n 10 python scripts/demo_model/train.py --out /tmp/demo

Runs on CPU with one thread (~22 min); everything (tokenizer, weights, data) is
seeded, so re-running reproduces the checkpoint (up to float rounding across
machines/library versions).

Two stages, both on ``LlavaForConditionalGeneration``:
  1. vision pretraining: the CLIP vision tower + projector are trained as a
     shape/colour classifier through a training-only linear probe on the
     mean-pooled projected image features (the probe is thrown away);
  2. full LLaVA training on chat-template text, loss only on the answer + ``</s>``,
     with the probe kept as a small auxiliary loss.
A held-out check (teacher-forced exact match == greedy result) runs every
``--check-every`` steps; if any question kind is below ``--target`` at the end,
training continues in ``--check-every`` chunks (at most ``--extra-rounds``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "vlmserve" / "demo_model"

IMAGE_SIZE = 64
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # "default" strategy drops CLS
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>", "<image>"]

# LLaVA-1.5 style. Parts of a list content are joined with "\n" in their order;
# image parts become "<image>". A system message is prepended followed by a space.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(parts=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url', 'input_image'] -%}"
    "{%- set ns.parts = ns.parts + ['<image>'] -%}"
    "{%- elif part['type'] in ['text', 'input_text'] -%}"
    "{%- set ns.parts = ns.parts + [part['text']] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.parts | join('\\n') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- content + ' ' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- 'USER: ' + content -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ASSISTANT: ' + content + '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- ' ASSISTANT:' -}}"
    "{%- endif -%}"
)


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- tokenizer / processor


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = data.tokenizer_corpus()
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    # Like llava-1.5 (LlamaTokenizer add_bos_token=True): encoding prepends <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    for t in SPECIAL_TOKENS:
        assert len(fast.encode(t, add_special_tokens=False)) == 1, t
    return fast


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
    )


# --------------------------------------------------------------------------- model


def build_model(tokenizer, args) -> LlavaForConditionalGeneration:
    vocab = len(tokenizer)
    vocab = (vocab + 7) // 8 * 8
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=args.vision_hidden * 4,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_hidden // 32,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=args.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.text_hidden,
        intermediate_size=args.text_intermediate,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_hidden // 32,
        num_key_value_heads=args.text_kv_heads,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=NUM_IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    cfg.bos_token_id = tokenizer.bos_token_id
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(cfg)
    return model.float()


# --------------------------------------------------------------------------- batching


def encode_samples(processor: LlavaProcessor, samples: list[dict], drop_bos: list[bool] | None = None):
    """Tokenize exactly what the chat template produces; loss only on the answer + </s>."""
    tok = processor.tokenizer
    image_token = processor.image_token
    seqs, labels = [], []
    images, image_labels = [], []
    for i, s in enumerate(samples):
        prompt = processor.apply_chat_template(s["messages"], add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(
            s["messages"] + [{"role": "assistant", "content": [{"type": "text", "text": s["answer"]}]}],
            tokenize=False,
        )
        assert full.startswith(prompt) and full[len(prompt):] == " " + s["answer"] + "</s>", (prompt, full)
        # Same expansion as LlavaProcessor.__call__ (one <image> -> NUM_IMAGE_TOKENS).
        expanded = full.replace(image_token, image_token * NUM_IMAGE_TOKENS)
        add_special = not (drop_bos is not None and drop_bos[i])
        ids = tok(expanded, add_special_tokens=add_special)["input_ids"]
        ans = tok(" " + s["answer"] + "</s>", add_special_tokens=False)["input_ids"]
        assert ids[-len(ans):] == ans, (ids[-10:], ans)
        seqs.append(ids)
        labels.append([-100] * (len(ids) - len(ans)) + ans)
        images.extend(s["images"])
        image_labels.extend((data.SHAPES.index(sh), data.COLOR_NAMES.index(c)) for c, sh in s["specs"])
    max_len = max(len(x) for x in seqs)
    pad = tok.pad_token_id
    input_ids = torch.full((len(seqs), max_len), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), max_len), dtype=torch.long)
    lab = torch.full((len(seqs), max_len), -100, dtype=torch.long)
    for i, (ids, lb) in enumerate(zip(seqs, labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        lab[i, : len(lb)] = torch.tensor(lb)
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": attn, "pixel_values": pixel_values, "labels": lab,
            "image_labels": torch.tensor(image_labels, dtype=torch.long)}


def train_batch(rng: random.Random, processor, batch_size: int, two_image_prob: float, system_prob: float,
                no_bos_prob: float):
    if rng.random() < two_image_prob:
        kinds = ["color_first", "color_second"]
    else:
        kinds = ["color", "shape", "describe"]
    samples = [data.make_sample(rng, rng.choice(kinds), data.TRAIN_DIST, system_prob=system_prob)
               for _ in range(batch_size)]
    drop_bos = [rng.random() < no_bos_prob for _ in samples]
    return encode_samples(processor, samples, drop_bos)


# --------------------------------------------------------------------------- held-out check


def build_check_set(processor, per_kind: int, seed: int, batch: int = 32):
    rng = data.heldout_stream(seed)
    samples = data.make_eval_set(rng, per_kind, data.EVAL_DIST)
    batches = []
    # group by number of images to limit padding
    for group in (["color", "shape", "describe"], ["color_first", "color_second"]):
        g = [s for s in samples if s["kind"] in group]
        for i in range(0, len(g), batch):
            chunk = g[i: i + batch]
            batches.append(([s["kind"] for s in chunk], encode_samples(processor, chunk)))
    return batches


@torch.no_grad()
def check(model, batches) -> dict[str, float]:
    """Teacher-forced exact match == greedy decoding reproduces answer + </s> exactly."""
    model.eval()
    dev = next(model.parameters()).device
    confusion = {}
    right = {k: 0 for k in data.KINDS}
    total = {k: 0 for k in data.KINDS}
    for kinds, b in batches:
        out = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                    pixel_values=b["pixel_values"].to(dev))
        pred = out.logits[:, :-1].argmax(-1).cpu()
        tgt = b["labels"][:, 1:]
        ok = ((pred == tgt) | (tgt == -100)).all(-1)
        first = (tgt != -100).int().argmax(-1)
        for k, p_, t_ in zip(kinds, pred[torch.arange(len(kinds)), first].tolist(),
                             tgt[torch.arange(len(kinds)), first].tolist()):
            if k == "shape":
                confusion[(t_, p_)] = confusion.get((t_, p_), 0) + 1
        for k, o in zip(kinds, ok.tolist()):
            right[k] += int(o)
            total[k] += 1
    model.train()
    check.confusion = confusion
    return {k: right[k] / total[k] for k in data.KINDS}


def fmt_acc(acc: dict[str, float]) -> str:
    return " ".join(f"{k}={v * 100:.1f}%" for k, v in acc.items())


def aux_loss(aux_head, f, image_labels, mode: str):
    """f: (n_images, NUM_IMAGE_TOKENS, text_hidden) projected image features."""
    if mode == "mean":
        logits = aux_head(f.mean(1))
        il = image_labels
    else:  # every image token must carry the image's shape and colour
        logits = aux_head(f).flatten(0, 1)
        il = image_labels.repeat_interleave(f.shape[1], dim=0)
    ns = len(data.SHAPES)
    loss = torch.nn.functional.cross_entropy(logits[:, :ns], il[:, 0]) + \
        torch.nn.functional.cross_entropy(logits[:, ns:], il[:, 1])
    acc = (logits[:, :ns].argmax(-1) == il[:, 0]).float().mean().item()
    return loss, acc


def vision_pretrain(model, processor, aux_head, feats, args, dev) -> None:
    """Stage 1: train vision tower + projector as a shape/colour classifier (probe discarded)."""
    rng = random.Random(f"vlmserve-demo/vision-pretrain/{args.seed}")
    params = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters()) \
        + list(aux_head.parameters())
    lr = args.vision_pretrain_lr or args.lr
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    t = time.time()
    ema = None
    for step in range(args.vision_pretrain_steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / args.warmup)
        imgs, labels = [], []
        for _ in range(args.vision_batch_size):
            c, sh = rng.choice(data.COLOR_NAMES), rng.choice(data.SHAPES)
            imgs.append(data.make_image(rng, c, sh, data.TRAIN_DIST))
            labels.append((data.SHAPES.index(sh), data.COLOR_NAMES.index(c)))
        pv = processor.image_processor(imgs, return_tensors="pt")["pixel_values"].to(dev)
        model.model.get_image_features(pixel_values=pv, vision_feature_layer=model.config.vision_feature_layer,
                                       vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        loss, acc = aux_loss(aux_head, feats.pop("img"), torch.tensor(labels, device=dev), args.aux_mode)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = acc if ema is None else 0.95 * ema + 0.05 * acc
        if (step + 1) % 50 == 0:
            log(f"vision pretrain {step + 1}/{args.vision_pretrain_steps} loss {loss.item():.3f} "
                f"shape-acc {ema:.3f} {(time.time() - t) / (step + 1):.2f}s/step")


# --------------------------------------------------------------------------- save


def save(model, processor, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tok = processor.tokenizer
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)
    # transformers 5 nests the image processor in processor_config.json; also write the
    # classic standalone preprocessor_config.json for tools that look for it.
    processor.image_processor.save_pretrained(out)
    # Portable tokenizer_config: the generic fast-tokenizer class (transformers 4.x and 5.x)
    # and <image> declared as the named extra special token.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc.pop("image_token", None)
    tc["extra_special_tokens"] = {"image_token": "<image>"}
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    pp = out / "preprocessor_config.json"
    cfg = json.loads(pp.read_text())
    cfg["image_processor_type"] = "CLIPImageProcessor"  # default backend when available
    pp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--two-image-prob", type=float, default=0.5)
    ap.add_argument("--system-prob", type=float, default=0.05)
    ap.add_argument("--no-bos-prob", type=float, default=0.1)
    ap.add_argument("--check-every", type=int, default=250)
    ap.add_argument("--check-per-kind", type=int, default=60)
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--extra-rounds", type=int, default=4, help="extra check-every chunks if below target")
    ap.add_argument("--vision-hidden", type=int, default=96)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--text-hidden", type=int, default=128)
    ap.add_argument("--text-intermediate", type=int, default=384)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--text-kv-heads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--aux-weight", type=float, default=0.5,
                    help="weight of a training-only shape/colour probe on the projected image features")
    ap.add_argument("--aux-mode", choices=["token", "mean"], default="mean")
    ap.add_argument("--vision-pretrain-steps", type=int, default=2000)
    ap.add_argument("--vision-batch-size", type=int, default=64)
    ap.add_argument("--vision-pretrain-lr", type=float, default=0.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--bench", type=int, default=0, help="only time N steps")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()

    processor = build_processor()
    tok = processor.tokenizer
    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"vocab={len(tok)} image_token_id={tok.convert_tokens_to_ids('<image>')} params={n_params / 1e6:.2f}M "
        f"(vision {sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e6:.2f}M, "
        f"text {sum(p.numel() for p in model.model.language_model.parameters()) / 1e6:.2f}M)")

    # Sanity: our manual encoding equals what LlavaProcessor produces.
    s = data.make_sample(data.heldout_stream(99), "color_first", data.TRAIN_DIST)
    prompt = processor.apply_chat_template(s["messages"], add_generation_prompt=True, tokenize=False)
    ref = processor(text=prompt, images=s["images"], return_tensors="pt")
    mine = encode_samples(processor, [s])
    n = ref["input_ids"].shape[1]
    assert torch.equal(ref["input_ids"][0], mine["input_ids"][0, :n]), "processor mismatch"
    assert torch.allclose(ref["pixel_values"], mine["pixel_values"])
    log(f"prompt example: {prompt!r}")

    check_batches = build_check_set(processor, args.check_per_kind, args.seed)
    log(f"held-out check set: {args.check_per_kind} per kind, built in {time.time() - t0:.1f}s")

    dev = torch.device(args.device)
    model.to(dev)
    params = list(model.parameters())
    aux_head = None
    feats = {}
    if args.aux_weight > 0 or args.vision_pretrain_steps:
        # Training-only probe (not saved): pushes shape/colour into every image's features.
        torch.manual_seed(args.seed + 1)
        aux_head = torch.nn.Linear(args.text_hidden, len(data.SHAPES) + len(data.COLOR_NAMES)).to(dev)
        params += list(aux_head.parameters())
        model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: feats.__setitem__("img", o))
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    if args.vision_pretrain_steps:
        vision_pretrain(model, processor, aux_head, feats, args, dev)

    rng = data.train_stream(args.seed)
    model.train()
    total_steps = args.bench or args.steps
    extra_left = args.extra_rounds
    step = 0
    ema = None
    aux_ema = None
    t_train = time.time()
    acc = None
    while True:
        while step < total_steps:
            b = train_batch(rng, processor, args.batch_size, args.two_image_prob, args.system_prob, args.no_bos_prob)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            image_labels = b.pop("image_labels").to(dev)
            out = model(**{k: v.to(dev) for k, v in b.items()})
            loss = out.loss
            if aux_head is not None and args.aux_weight > 0:
                aux, aux_acc = aux_loss(aux_head, feats.pop("img"), image_labels, args.aux_mode)
                loss = loss + args.aux_weight * aux
                aux_ema = aux_acc if aux_ema is None else 0.95 * aux_ema + 0.05 * aux_acc
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            ema = out.loss.item() if ema is None else 0.95 * ema + 0.05 * out.loss.item()
            if step % 25 == 0 or step == 1:
                el = time.time() - t_train
                aux_txt = f" aux-shape-acc {aux_ema:.3f}" if aux_ema is not None else ""
                log(f"step {step}/{total_steps} loss {ema:.4f}{aux_txt} lr {lr_at(step - 1):.2e} "
                    f"{el / step:.2f}s/step elapsed {el / 60:.1f}min")
            if args.bench:
                continue
            if step % args.check_every == 0 or step == total_steps:
                acc = check(model, check_batches)
                log(f"  held-out @ {step}: {fmt_acc(acc)}")
                if args.verbose:
                    log(f"  shape confusion (target id, pred id): {sorted(check.confusion.items())}")
        if args.bench:
            log(f"bench: {(time.time() - t_train) / step:.3f}s/step")
            return
        if min(acc.values()) >= args.target or extra_left == 0:
            break
        extra_left -= 1
        total_steps += args.check_every
        log(f"below target {args.target:.0%}; training {args.check_every} more steps")

    if min(acc.values()) < args.target:
        log(f"WARNING: held-out accuracy below target: {fmt_acc(acc)}")
    save(model.cpu(), processor, args.out)
    for f in args.out.iterdir():
        f.chmod(0o644)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    log(f"saved to {args.out} ({size / 1e6:.2f} MB); total time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
