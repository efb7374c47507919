#!/usr/bin/env python
"""Fine-tunes a DiffewS pipeline on few-shot episodes, on one GPU or many, with Accelerate.

    accelerate launch train/train.py --pretrained DIR --dataset coco20i --data-root /data/coco --fold 0 \\
        --output-dir runs/coco_fold0

The defaults are the authors' recipe: AdamW (lr 1e-5, weight decay 0.01, betas (0.9, 0.999), eps 1e-8), linear
decay to 1e-7 without warm-up, gradient clipping 1.0, fp16 on GPU, batch 1 x accumulation 4, 1..2 shots per step,
loss MSE(unet_output, -z_query_mask). The VAE is frozen; the whole UNet (with `conv_in_ref`) is trained.

The design (the paper's design space: `--interaction`, `--mask-injection`, `--target`, `--generation`, with
`--beta-start` / `--beta-end` and `--image-encoder`) is the --pretrained pipeline's unless an option is given; an
option given changes that choice alone, the pipeline is adapted to the design before the first step, and the saved
pipeline carries it (`pipeline_diffews.checkpoints.design_components`):

- the UNet is rebuilt for the design (`DiffewSUNet2DConditionModel.from_unet`), every weight both designs share
  copied: the whole UNet for a change of target, of `mi2m` <-> `oi2m`, of `kv_fusion` <-> `qkv_fusion`, of
  `multiply` <-> `add` <-> `multiply_latent` <-> `attention_mask` (the same 4-channel `conv_in_ref`);
- `conv_in_ref` of another width is made anew from `conv_in` (8 channels for `concat`: repeated and halved, bias
  copied; 4 channels: a copy); the tokenized interaction drops it and adds `support_token_proj` (the image encoder's
  token width to the cross-attention width: the identity when they match, else PyTorch's default initialisation);
- `mn2m` widens `conv_in` to 8 channels (image latent, noisy mask latent) as Marigold: repeated and halved; leaving
  `mn2m` sums the two halves back;
- `mi2m` / `mn2m` get a DDIM scheduler (`make_scheduler`: the --pretrained one is kept when the generation is
  unchanged and no beta is given), `oi2m` none;
- the tokenized interaction loads `--image-encoder` (frozen, like the VAE), or keeps the --pretrained pipeline's;
  the other interactions drop it.

Training with 1..N shots per step (the paper's DiffewS-n) is `--max-shots N`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python train/train.py` from anywhere

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed  # noqa: E402
from diffusers.optimization import get_polynomial_decay_schedule_with_warmup  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline_diffews import DiffewSUNet2DConditionModel, ModelNotFoundError, load_pipeline  # noqa: E402
from pipeline_diffews.checkpoints import (  # noqa: E402
    CheckpointError,
    add_design_arguments,
    design_components,
    design_from_options,
    load_image_encoder,
)
from pipeline_diffews.hub import build_model_card  # noqa: E402
from train.checkpointing import CheckpointUploader, check_resume, resolve_resume, save_checkpoint  # noqa: E402
from train.data import SOURCES, ConcatSource, TrainingEpisodes, build_source  # noqa: E402
from train.data.registry import ROOTLESS_SOURCES  # noqa: E402
from train.episode_batch import EpisodeCollator, TrainingDesign, diffews_loss, encode_episodes  # noqa: E402
from train.source_options import add_source_option_argument, source_option  # noqa: E402

logger = get_logger("diffews.train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--pretrained", required=True,
      help="DiffewS pipeline folder, Hub repo (from init_from_sd or a converter) or official name (incontext, ...).")
    a("--dataset", required=True, choices=sorted(SOURCES), help="Training data source.")
    a("--data-root", default=None,
      help="The dataset's folder (incontext: a folder with coco/, ade20k/, voc/; synthetic: none).")
    a("--output-dir", required=True, help="Checkpoints, logs and the final pipeline go here.")
    a("--split", default="train", help="Dataset split to train on (default: train).")
    a("--fold", type=int, default=None, help="Train on this fold's training classes (default: all classes).")
    a("--mix-dataset", choices=sorted(SOURCES), default=None,
      help="Also draw episodes from this source (its train split, every class): e.g. keep a skill learnt on it "
           "while fine-tuning on --dataset.")
    a("--mix-data-root", default=None, help="The --mix-dataset's folder (synthetic: none).")
    a("--mix-share", type=float, default=0.5,
      help="Fraction of the episodes drawn from --mix-dataset (0 < share < 1; default 0.5), a uniform class in it.")
    a("--mix-source-option", type=source_option, action="append", default=[], metavar="KEY=VALUE",
      help="Extra argument of the --mix-dataset source, repeatable (as --source-option).")
    a("--max-steps", type=int, default=10_000, help="Optimisation steps (10k strict few-shot, 30k in-context).")
    a("--batch-size", type=int, default=1, help="Episodes per process per micro-step.")
    a("--gradient-accumulation-steps", type=int, default=4)
    a("--learning-rate", type=float, default=1e-5)
    a("--lr-end", type=float, default=1e-7, help="Learning rate at the last step (linear decay, no warm-up).")
    a("--weight-decay", type=float, default=1e-2)
    a("--adam-beta1", type=float, default=0.9)
    a("--adam-beta2", type=float, default=0.999)
    a("--adam-epsilon", type=float, default=1e-8)
    a("--max-grad-norm", type=float, default=1.0)
    a("--max-shots", type=int, default=2, help="Shots per step are drawn uniformly from 1..max_shots.")
    a("--resolution", type=int, default=512, help="Square training resolution; also the saved pipeline's default.")
    a("--latent-sampling", choices=("mean", "sample"), default="mean",
      help="VAE latents of the training images and masks: posterior mean (as at inference) or a sample.")
    a("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
      help="Default: fp16 on GPU (the authors' recipe), no on CPU.")
    a("--gradient-checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    a("--allow-tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs.")
    a("--checkpointing-steps", type=int, default=2000, help="Save the training state every N steps.")
    a("--checkpoints-total-limit", type=int, default=3, help="Keep the last K checkpoints (default 3; 0: all).")
    a("--resume", default=None, help="'latest' or a checkpoint-<step> folder: continue that run exactly.")
    a("--stop-after-steps", type=int, default=None,
      help="Save a checkpoint and stop after this many steps of this invocation (for time-limited jobs).")
    a("--seed", type=int, default=42)
    a("--dataloader-num-workers", type=int, default=4)
    a("--report-to", default="tensorboard", help="Accelerate tracker(s): tensorboard, wandb, all, or none.")
    a("--push-to-hub", metavar="REPO", default=None,
      help="Upload each checkpoint in the background, and the final pipeline, to this Hub model repo.")
    a("--hub-token", default=None)
    a("--hub-private", action="store_true")
    a("--cpu", action="store_true", help="Train on CPU (several processes: accelerate launch --multi_gpu).")
    add_source_option_argument(p)
    add_design_arguments(p, default_help="default: the --pretrained pipeline's")
    args = p.parse_args(argv)
    if args.data_root is None and args.dataset not in ROOTLESS_SOURCES:
        p.error(f"--data-root is required for --dataset {args.dataset}")
    if args.mix_dataset is not None:
        if args.mix_dataset == args.dataset:
            p.error(f"--mix-dataset must differ from --dataset, both are {args.dataset}")
        if args.mix_data_root is None and args.mix_dataset not in ROOTLESS_SOURCES:
            p.error(f"--mix-data-root is required for --mix-dataset {args.mix_dataset}")
        if not 0 < args.mix_share < 1:
            p.error(f"--mix-share must be between 0 and 1 (exclusive), got {args.mix_share}")
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_shots", "checkpointing_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.checkpoints_total_limit < 0:
        p.error("--checkpoints-total-limit must be >= 0")
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if torch.cuda.is_available() and not args.cpu else "no"
    return args


def make_accelerator(args) -> Accelerator:
    output_dir = Path(args.output_dir)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        cpu=args.cpu,
    )


DESIGN_OPTIONS = ("interaction", "mask_injection", "target", "generation")


def adapt_design(args, pipe):
    """`pipe` adapted to the design options given (see the module's docstring); unchanged when none is given."""
    given = [name for name in (*DESIGN_OPTIONS, "beta_start", "beta_end", "image_encoder")
             if getattr(args, name) is not None]
    if not given:
        return pipe
    design = design_from_options(pipe.unet.config.get("design"), **{k: getattr(args, k) for k in DESIGN_OPTIONS})
    if args.image_encoder is not None:
        if design.interaction != "tokenized_cross_attention":
            raise CheckpointError(
                f"--image-encoder is used by the tokenized_cross_attention interaction only, not {design.interaction}."
            )
        encoder, processor = load_image_encoder(args.image_encoder)
    else:
        encoder, processor = getattr(pipe, "image_encoder", None), getattr(pipe, "feature_extractor", None)
    components = design_components(pipe.unet, design, getattr(pipe, "scheduler", None), encoder, processor,
                                   args.beta_start, args.beta_end)
    pipe.register_modules(**components)
    logger.info(f"Design: {design.describe()}", main_process_only=True)
    return pipe


def load_models(args, accelerator):
    """The pipeline adapted to the design options: its UNet trained (float32 master weights), its VAE and image
    encoder (if any) frozen, on the device, cast to the mixed-precision dtype."""
    pipe = adapt_design(args, load_pipeline(args.pretrained, dtype=torch.float32))
    pipe.unet.requires_grad_(True).train()
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    for frozen in (pipe.vae, getattr(pipe, "image_encoder", None)):
        if frozen is not None:
            frozen.requires_grad_(False).eval().to(accelerator.device)
            if dtype is not None:
                frozen.to(dtype)
    return pipe


def make_optimizer(args, accelerator, unet):
    """AdamW and the linear decay from the learning rate to --lr-end over --max-steps, without warm-up."""
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay, eps=args.adam_epsilon,
    )
    # Accelerate steps a prepared scheduler once per process at every optimisation step (DeepSpeed: once).
    per_step = 1 if accelerator.distributed_type == DistributedType.DEEPSPEED else accelerator.num_processes
    scheduler = get_polynomial_decay_schedule_with_warmup(
        optimizer, 0, args.max_steps * per_step, lr_end=args.lr_end, power=1.0
    )
    return optimizer, scheduler


def build_loader(args, accelerator, first_step: int) -> tuple:
    """The training source and its episode loader from `first_step` on (not yet prepared).

    Step s, slot i of the episode stream is a pure function of (seed, s, i); `accelerator.prepare` gives each process
    its own block of slots, so processes see disjoint episodes and a resumed run sees the very same ones.
    """
    with accelerator.main_process_first():  # the main process writes the dataset's index cache first
        source = build_source(args.dataset, args.data_root, args.split, args.fold, "train", **dict(args.source_option))
        if args.mix_dataset is not None:
            mixed = build_source(args.mix_dataset, args.mix_data_root, "train", None, "train",
                                 **dict(args.mix_source_option))
            source = ConcatSource({args.dataset: source, args.mix_dataset: mixed},
                                  weighting={args.dataset: 1 - args.mix_share, args.mix_dataset: args.mix_share})
    accum = args.gradient_accumulation_steps
    episodes = TrainingEpisodes(
        source, max_shots=args.max_shots, batch_size=args.batch_size, seed=args.seed,
        num_steps=args.max_steps * accum, world_size=accelerator.num_processes, start_step=first_step * accum,
        accumulation_steps=accum,
    )
    loader = torch.utils.data.DataLoader(
        episodes, batch_size=args.batch_size, shuffle=False, collate_fn=EpisodeCollator(args.resolution),
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # worker seeds must not consume the global generator
    )
    return source, loader


def make_uploader(args, accelerator) -> CheckpointUploader | None:
    """The background Hub uploader of --push-to-hub (main process only), else None."""
    if args.push_to_hub and accelerator.is_main_process:
        return CheckpointUploader(args.push_to_hub, token=args.hub_token, private=args.hub_private or None)
    return None


def tracker_config(args) -> dict:
    """The run's arguments as tracker hyperparameters (numbers, strings and booleans as they are, others as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: training stops before the weights are touched."""


def check_finite(losses: torch.Tensor, step: int, shots: int) -> None:
    """Raises NonFiniteLossError when a process's loss of optimisation step `step` is NaN or inf."""
    if not torch.isfinite(losses).all():
        raise NonFiniteLossError(
            f"The loss is {losses.tolist()} at step {step} (shots {shots}): stopping before the weights are updated. "
            "Lower --learning-rate, try --mixed-precision bf16 or no, or check the data; resume from the last good "
            "checkpoint with --resume."
        )


def log_step(accelerator, progress, step: int, loss: float, lr: float, shots: int) -> None:
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}")
    accelerator.log({"loss": loss, "lr": lr, "shots": shots}, step=step)


def design_parts(args, pipe) -> dict:
    """The optional components of the trained pipeline's design, as `save_pipeline` passes them: the scheduler; the
    image encoder of --image-encoder read again in float32 (one kept from --pretrained is read from there); None for
    those the design has not."""
    parts = {"scheduler": getattr(pipe, "scheduler", None)}
    if getattr(pipe, "image_encoder", None) is None:
        parts.update(image_encoder=None, feature_extractor=None)
    elif args.image_encoder is not None:
        parts.update(zip(("image_encoder", "feature_extractor"), load_image_encoder(args.image_encoder)))
    return parts


def save_pipeline(accelerator, args, unet, design_parts: dict) -> None:
    """Writes the trained pipeline (UNet in float32, the original VAE and settings, the design's scheduler and image
    encoder `design_parts`) to `args.output_dir`."""
    state = accelerator.get_state_dict(unet)  # on every process: gathers sharded (FSDP / ZeRO-3) weights
    if not accelerator.is_main_process:
        return
    trained = DiffewSUNet2DConditionModel.from_config(accelerator.unwrap_model(unet).config)
    trained.load_state_dict({k: v.float().cpu() for k, v in state.items()})
    pipe = load_pipeline(args.pretrained, unet=trained, processing_resolution=args.resolution, **design_parts)
    pipe.save_pretrained(args.output_dir)
    readme = Path(args.output_dir) / "README.md"
    if args.push_to_hub and not readme.is_file():
        build_model_card(pipe, repo_id=args.push_to_hub).save(readme)
    logger.info(f"Saved the trained pipeline to {args.output_dir}")


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.gradient_accumulation_steps != args.gradient_accumulation_steps:  # set by an Accelerate config
        logger.warning(f"Gradient accumulation: {accelerator.gradient_accumulation_steps} steps (Accelerate config).")
        args.gradient_accumulation_steps = accelerator.gradient_accumulation_steps
    set_seed(args.seed)
    resume = resolve_resume(args.resume, args.output_dir)
    first_step = check_resume(args, accelerator, resume)

    pipe = load_models(args, accelerator)
    unet, vae, timestep, design = pipe.unet, pipe.vae, pipe.config.timestep, TrainingDesign.of(pipe)
    optimizer, scheduler = make_optimizer(args, accelerator, unet)
    source, loader = build_loader(args, accelerator, first_step)
    unet, optimizer, loader, scheduler = accelerator.prepare(unet, optimizer, loader, scheduler)
    if resume:
        accelerator.load_state(str(resume[1]))
        logger.info(f"Resumed from {resume[1]} (step {first_step})")
    uploader = make_uploader(args, accelerator)
    if accelerator.is_main_process:
        accelerator.init_trackers("diffews", config=tracker_config(args))
    logger.info(
        f"{len(source.class_ids)} classes, {args.max_steps} steps of {args.batch_size} x "
        f"{args.gradient_accumulation_steps} x {accelerator.num_processes} episodes, "
        f"{accelerator.mixed_precision} precision, from step {first_step}"
    )

    last_step = args.max_steps
    if args.stop_after_steps is not None:
        last_step = min(args.max_steps, first_step + args.stop_after_steps)
    step, step_loss, sample = first_step, 0.0, args.latent_sampling == "sample"
    progress = tqdm(total=args.max_steps, initial=step, desc="steps", disable=not accelerator.is_local_main_process)
    for pixels in loader if step < last_step else ():  # nothing to run when resuming at the last step
        shots = pixels.support.shape[1]
        with accelerator.accumulate(unet):
            latents = encode_episodes(vae, pixels, sample=sample, design=design)
            loss = diffews_loss(unet, latents, timestep, design=design)  # noise and timesteps: torch's generator
            losses = accelerator.gather(loss.detach().reshape(1))  # every process sees every process's loss
            check_finite(losses, step + 1, shots)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step_loss += losses.float().mean().item() / args.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            continue
        step += 1
        log_step(accelerator, progress, step, step_loss, scheduler.get_last_lr()[0], shots)
        step_loss = 0.0
        if step % args.checkpointing_steps == 0 or step == last_step < args.max_steps:
            save_checkpoint(accelerator, args, step, uploader)
        if step >= last_step:
            break
    progress.close()

    accelerator.wait_for_everyone()
    if step >= args.max_steps:
        save_pipeline(accelerator, args, unet, design_parts(args, pipe))
        if uploader is not None:
            uploader.submit(args.output_dir, "", ignore_patterns=["checkpoint-*"],
                            commit_message="Trained DiffewS pipeline")
    else:
        logger.info(f"Stopped at step {step} of {args.max_steps}: continue with --resume latest.")
    failed = bool(uploader.wait()) if uploader is not None else False
    if failed:
        logger.error(f"Some uploads to {args.push_to_hub} failed; every file is still in {args.output_dir}.")
    accelerator.end_training()
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NonFiniteLossError as error:
        logging.getLogger("diffews.train").error(str(error))
        sys.exit(2)
    except ModelNotFoundError as error:  # one line, no traceback: the model named cannot be loaded
        sys.exit(f"error: --pretrained {error}")
    except CheckpointError as error:  # a design the paper does not define, a missing --image-encoder, ...
        sys.exit(f"error: {error}")
