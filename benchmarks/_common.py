"""Shared by the benchmark scripts: load the model (or a randomly initialised copy of its
architecture, for timing on machines without the model package) and synchronise."""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16 (default float32)")
    ap.add_argument(
        "--random-init", metavar="DIR", default=None,
        help="time a randomly initialised model built from DIR/config.json (+ tokenizer files): same "
        "architecture and cost as the real one, no weights needed; quality figures are then meaningless",
    )


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    import neuraldb

    if args.random_init is None:
        return neuraldb.load_model(args.model, device=args.device, dtype=args.dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.random_init)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(args.random_init)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"
