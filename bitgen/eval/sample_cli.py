"""``bitgen sample``: draw samples from a trained run (CoBit or the AR baseline) and write them out.

Examples::

    bitgen sample --run-dir runs/demo/cobit --num 64 --seed 0 --out samples.txt
    bitgen sample --run-dir runs/demo/cobit sampler.name=heun sampler.grid=karras \\
        sampler.gamma=0.13 sampler.nfe=128 sampler.window_q=0.1,0.9 --num 256 --out heun.txt
    bitgen sample --run-dir runs/demo/ar --temperature 0.9 --top-p 0.95 --num 64 --out ar.txt
    bitgen sample --run-dir runs/demo/cobit --prompt "the cat sat" --num 8 --out cat.txt
    bitgen sample --run-dir runs/demo/ar --prompts prompts.txt --num 4 --out prompted.txt
    bitgen sample --run-dir runs/demo/cobit --infill "the cat[GAP:6] on the mat" --num 8

Prompts (``bitgen.prompts``): ``--prompt TEXT`` (repeatable) or ``--prompts FILE`` (one prompt per
line, no blank lines) draw ``--num`` samples per prompt, each beginning with TEXT: its tokens
(the run's tokenizer, no special tokens, no separator before them) fill the start of the row.
``--infill TEXT`` (repeatable, CoBit runs only) marks each gap as ``[GAP:N]``, N generated tokens;
the text around the gaps is kept. CoBit clamps the given tokens' bits at every solver step; a model
trained without conditioning takes them as "replacement" conditioning, which it was not trained
for. AR runs feed a prompt as the prefix of their continuation.

Outputs: ``--out`` (default ``<run>/samples/<step>_seed<S>.txt``) holds the texts (one sample
per block, blocks separated by a ``=== i ===`` line); ``<out>.jsonl`` holds one JSON object per
sample (text, ids, packed bits as hex, invalid-code count, seed, prompt or null, settings).

The library behind it is ``bitgen.loading`` (``load_model``) and ``bitgen.generation``
(``generate``, ``write_samples``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bitgen.generation import (
    check_guidance,
    generate,
    generate_prompted,
    guidance_note,
    not_beginning_with_prompt,
    sampler_settings_dict,
    sampling_options,
    write_samples,
)
from bitgen.loading import WEIGHTS, load_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``bitgen sample`` and ``bitgen eval``: which model and how to sample it."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a training run directory (latest checkpoint)")
    source.add_argument("--checkpoint", help="a checkpoints directory or one <step> directory in it")
    source.add_argument("--model-dir", help="a model folder written by `bitgen export` (or hf:OWNER/NAME)")
    source.add_argument("--params", help="a parameter file: .npz from `bitgen convert` (e.g. the released "
                                         "CoBit weights) or .safetensors, with --config")
    parser.add_argument("--step", type=int, help="checkpoint step to read (default: the newest good one)")
    parser.add_argument("--config", help="config name/path (default: the run's config.json; "
                                         "required with --params)")
    parser.add_argument("--table", help="entropy table: lm1b | owt | owt_medium | .npz | directory "
                                        "(default: the run's newest entropy table)")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="ema",
                        help="EMA weights (default) or the raw training parameters")
    parser.add_argument("--temperature", type=float,
                        help="AR runs: softmax temperature (default: the run's family.temperature)")
    parser.add_argument("--top-p", type=float,
                        help="AR runs: nucleus mass (default: the run's family.top_p)")
    parser.add_argument("--guidance", type=float, metavar="W",
                        help="CoBit runs with a prompt: classifier-free guidance scale (sets "
                             "sampler.guidance; 1 = the conditional model, the default; 0 = the "
                             "unconditional one; > 1 amplifies the prompt; w != 1 costs two network "
                             "calls per denoise out of the same NFE)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="sampler.* / family.* overrides, e.g. sampler.name=heun sampler.nfe=128 "
                             "(with --params: any config key, e.g. data.tokenizer=PATH)")


def load_model_from_args(args: argparse.Namespace):
    """``bitgen.loading.load_model`` with the options of ``add_model_arguments`` (``--guidance W``
    is the override ``sampler.guidance=W``, after any given as ``section.field=value``)."""
    guidance = [] if args.guidance is None else [f"sampler.guidance={args.guidance!r}"]
    return load_model(args.run_dir, args.checkpoint, model_dir=args.model_dir, params=args.params,
                      config=args.config, overrides=[*args.overrides, *guidance], table=args.table,
                      weights=args.weights, step=args.step)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_override_argument(parser)
    parser.add_argument("--num", type=int, default=16,
                        help="number of samples (per prompt with --prompt, --prompts or --infill)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="text output; the JSONL goes next to it (default: "
                                      "<run>/samples/<step>_seed<S>.txt, or "
                                      "./samples/<file or folder name>_seed<S>.txt)")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="draw --num samples beginning with TEXT (repeatable); CoBit clamps "
                              "the prompt's bits, which a model trained unconditionally takes as "
                              "'replacement' conditioning; AR continues it")
    prompts.add_argument("--prompts", metavar="FILE",
                         help="prompts, one per line (no blank lines): --num samples each")
    prompts.add_argument("--infill", action="append", metavar="TEXT",
                         help="CoBit runs: text with gaps written [GAP:N] (N generated tokens), "
                              "e.g. 'the cat[GAP:6] on the mat'; the rest of the text is kept "
                              "(repeatable)")


def run(args: argparse.Namespace) -> int:
    from bitgen.preemption import PreemptionFlag

    from bitgen.prompts import layouts, read_prompts

    model = load_model_from_args(args)
    texts = args.prompt or (read_prompts(args.prompts) if args.prompts else [])
    prompts = layouts(model.text, model.cfg.model.seq_tokens, prompts=texts, infills=args.infill or [])
    check_guidance(model, model.cfg.sampler, conditioned=bool(prompts))
    print(f"bitgen sample: {model.task} model from {model.source} (step {model.step})",
          file=sys.stderr)
    if (note := guidance_note(model.cfg.sampler)) is not None:
        print(f"bitgen sample: {note}", file=sys.stderr)
    start = time.perf_counter()
    with PreemptionFlag() as flag:
        options = {"temperature": args.temperature, "top_p": args.top_p,
                   "progress": not args.no_progress}
        samples = (generate_prompted(model, prompts, args.num, args.seed, flag=flag, **options)
                   if prompts else generate(model, args.num, args.seed, flag=flag, **options))
    temperature, top_p = sampling_options(model, args.temperature, args.top_p)
    settings = sampler_settings_dict(model, model.cfg.sampler, temperature=temperature, top_p=top_p)
    default = (model.run / "samples" / f"{model.step}_seed{args.seed}.txt" if model.run else
               Path("samples") / f"{Path(model.source).name}_seed{args.seed}.txt")
    out = Path(args.out) if args.out else default
    jsonl = write_samples(samples, out, settings)
    print(f"bitgen sample: wrote {len(samples)} samples to {out} and {jsonl} "
          f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    joined = [] if args.infill else not_beginning_with_prompt(samples)
    if joined:
        print(f"bitgen sample: warning: {len(joined)} samples (first: {joined[0].index}) begin with "
              "the prompt's tokens but the tokenizer's decoder joined its last token to the next, so "
              "their text does not begin with the prompt", file=sys.stderr)
    if flag.requested:
        print("bitgen sample: stopped early by a signal; the file holds the samples drawn so far",
              file=sys.stderr)
        return 128 + (flag.signum or 15)
    return 0
