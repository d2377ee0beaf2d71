"""Repair a pruned Mistral model with SEFT on Alpaca-format instructions.

    accelerate launch recipes/mistral_alpaca.py --config recipes/configs/<config>.yaml
    python recipes/mistral_alpaca.py --model_name_or_path PATH --dataset_name data.jsonl --prune_method wanda ...

Every option of seft_trl.apps.recipes (data, pruning, evaluation), SEFTConfig and TRL's ModelConfig
works from the command line or the YAML file; see `--help`.
"""

from seft_trl.apps.noise import silence_import_noise

silence_import_noise()  # torchao and bitsandbytes log them when seft_trl.apps.recipes imports transformers

from seft_trl.apps.recipes import run  # noqa: E402

if __name__ == "__main__":
    run(default_model="mistralai/Mistral-7B-v0.1")
