"""MLM loss, accuracy and perplexity of a pretraining checkpoint on the val shards.

    python -m pretrain.evaluate --run runs/demo                      # newest complete checkpoint
    python -m pretrain.evaluate --run runs/demo --tag global_step300 --max-batches 50
    deepspeed --num_gpus 2 pretrain/evaluate.py --run runs/demo     # val split shared by the ranks

Any attention variant, any ZeRO stage: the checkpoint is gathered into one fp32 state dict
(pretrain.state_dict) and loaded into a plain BertMLM. The val batches are exactly the trainer's
(fixed order, masks seeded by (train.seed, 0, sample key)), so ``--dp-size N --max-batches K`` with a
training run's data-parallel size and train.eval_batches reproduces the val numbers it logged.
Writes one JSON object to stdout (the log goes to stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

import torch  # noqa: E402

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_mlm(model: torch.nn.Module, cfg, ranks: list[int], dp_size: int, micro_batch_size: int,
                 max_batches: int = 0, device: torch.device | str = "cpu", group=None) -> dict[str, float]:
    """MLM metrics of ``model`` on the val split of ``cfg.data.data_dir``.

    Args:
        ranks: the data-parallel ranks whose share of the val split this process reads (all of
            ``range(dp_size)`` to emulate a data-parallel evaluation in one process).
        dp_size: data-parallel size the val split is divided by.
        max_batches: cap on batches per rank (the trainer's train.eval_batches); 0 = all.
        group: process group the sums are reduced over (None: no reduction).

    Returns:
        val/loss (mean cross-entropy per predicted token), val/mlm_accuracy, val/perplexity,
        val/tokens (predicted tokens), val/unigram_entropy (loss of predicting label frequencies).
    """
    from data_pipeline.loader import build_val_loader
    from launch.distributed import all_reduce_sum

    model.eval()
    vocab = int(model.embedding.word_embeddings.weight.shape[0])
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, predicted tokens, correct
    counts = torch.zeros(vocab, dtype=torch.float64)
    for r in ranks:
        for batch in build_val_loader(cfg, r, dp_size, micro_batch_size, max_batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum, n, correct = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         tokentype_ids=batch["token_type_ids"], labels=batch["labels"])
            sums += torch.tensor([loss_sum.item(), n.item(), correct.item()], dtype=torch.float64)
            labels = batch["labels"][batch["labels"] >= 0].cpu()
            counts += torch.bincount(labels, minlength=vocab)[:vocab].double()
    if group is not None:
        sums, counts = all_reduce_sum(sums, group), all_reduce_sum(counts, group)
    n = max(sums[1].item(), 1.0)
    p = counts[counts > 0] / counts.sum().clamp(min=1)
    loss = sums[0].item() / n
    return {"val/loss": loss, "val/mlm_accuracy": sums[2].item() / n, "val/perplexity": math.exp(min(loss, 50.0)),
            "val/tokens": sums[1].item(), "val/unigram_entropy": float(-(p * p.log()).sum())}


def eval_config(ck, data_dir: str | None = None):
    """The run's config pointed at ``data_dir`` (default: the run's own), with that data's seq_len.

    Raises:
        CheckpointError: the data was tokenized with another tokenizer, or its sequences are too long.
    """
    from data_pipeline.loader import read_manifest
    from pretrain.state_dict import CheckpointError, check_tokenizer

    cfg = ck.cfg
    data_dir = data_dir or cfg.data.data_dir
    manifest = read_manifest(data_dir)
    check_tokenizer(ck, manifest.get("tokenizer", {}).get("sha256"), f"the tokenizer of {data_dir}")
    seq_len = int(manifest["seq_len"])
    if seq_len > cfg.model.max_position_embeddings:
        raise CheckpointError(f"{data_dir} holds {seq_len}-token sequences but the model has "
                              f"{cfg.model.max_position_embeddings} positions; prepare the data with a shorter "
                              "data.seq_len")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir, seq_len=seq_len))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="pretraining run dir (or its checkpoints/global_stepN)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step600 (default: newest complete)")
    parser.add_argument("--data-dir", default=None, help="prepared data whose val shards to read (default: the run's)")
    parser.add_argument("--micro-batch-size", type=int, default=0, help="default: the run's train.micro_batch_size")
    parser.add_argument("--max-batches", type=int, default=0, help="batches per data-parallel rank; 0 = all")
    parser.add_argument("--dp-size", type=int, default=0,
                        help="read the val split as N data-parallel ranks do (one process: all N shares in turn); "
                             "default: the launched world")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    from launch.cli import error_exit, setup_logging

    setup_logging(rank)
    from data_pipeline.errors import DataError
    from launch.config import ConfigError
    from pretrain.state_dict import CheckpointError, find_checkpoint, init_single_process, load_model

    try:
        ck = find_checkpoint(args.run, args.tag)
        cfg = eval_config(ck, args.data_dir)
        info = init_single_process(cfg.train.seed)
        if args.dp_size and info.dp_size > 1 and args.dp_size != info.dp_size:
            raise ValueError(f"--dp-size {args.dp_size} differs from the {info.dp_size} launched data-parallel ranks; "
                             "leave it out under a launcher")
        dp_size = args.dp_size or info.dp_size
        ranks = [info.dp_rank] if info.dp_size > 1 else list(range(dp_size))
        mb = args.micro_batch_size or cfg.train.micro_batch_size
        if mb <= 0 or args.max_batches < 0:
            raise ValueError("--micro-batch-size must be > 0 and --max-batches >= 0")
        model = load_model(ck, info.device)
        from launch.distributed import data_parallel_group
        from model.attention.base import set_seed, set_step
        from model.bert import layer_attention_configs

        set_seed(cfg.train.seed)  # hashed attentions: keyed as at the trainer's last evaluation
        set_step(max(ck.step - 1, 0))
        result = evaluate_mlm(model, cfg, ranks, dp_size, mb, args.max_batches, info.device,
                              data_parallel_group() if info.dp_size > 1 else None)
    except (CheckpointError, ConfigError, DataError, ValueError) as e:
        return error_exit(e, rank)
    from launch.distributed import shutdown_distributed

    shutdown_distributed()
    if rank == 0:
        out = {"run": ck.run_dir, "checkpoint": ck.path, "step": ck.step, "zero_stage": ck.zero_stage,
               "attention": [c.name for c in layer_attention_configs(cfg)],
               "data_dir": cfg.data.data_dir, "dp_size": dp_size, "micro_batch_size": mb,
               "max_batches": args.max_batches, **result}
        logger.info("%s: val loss %.4f, mlm accuracy %.4f, perplexity %.2f over %d predicted tokens",
                    ck.describe(), result["val/loss"], result["val/mlm_accuracy"], result["val/perplexity"],
                    result["val/tokens"])
        text = json.dumps(out, indent=1) + "\n"
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
