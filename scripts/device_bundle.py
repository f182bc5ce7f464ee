"""Write what a GPU machine without the package index needs to run the Flower-free core
and its CUDA checks, in one folder small enough to travel (under 64 MiB):

- ``minilm/``: the packaged MiniLM (all 6 layers) saved in float16 with its tokenizer
  (fedalora loads every base in float32 again);
- ``smollm2/``: SmolLM2-135M's config and tokenizer only, no weights:
  ``benchmarks/cohort.py --random-weights`` builds the model from them (same shapes,
  same work per step; speed does not depend on the weights' values);
- ``bbc-news.csv`` and ``instructions.jsonl``: the packaged BBC News and instruction
  data as local files (columns text/label and instruction/response/task).

Wheels the machine lacks go beside them with ``pip download`` (see benchmarks/RESULTS.md).

    .venv/bin/python scripts/device_bundle.py .gpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from fedalora.data import ColumnNames, load_labelled_dataset
from fedalora.models import model_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    folder.mkdir(parents=True, exist_ok=True)
    minilm = model_source("minilm")
    AutoModel.from_pretrained(minilm, dtype=torch.float16).save_pretrained(folder / "minilm")
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder / "minilm")
    smollm2 = model_source("smollm2")
    AutoConfig.from_pretrained(smollm2).save_pretrained(folder / "smollm2")
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(folder / "smollm2")
    load_labelled_dataset("bbc-news", ColumnNames(), False).to_csv(folder / "bbc-news.csv")
    instructions = load_labelled_dataset("instructions", ColumnNames(), False)
    with (folder / "instructions.jsonl").open("w", encoding="utf-8") as out:
        for row in instructions:
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
