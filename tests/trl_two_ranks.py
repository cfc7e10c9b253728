"""Run by tests/test_reward_client.py under torch.distributed.run (2 CPU processes, gloo): TRL's GRPOTrainer for
two steps with a tiny policy, 4 completions per prompt and 2 per process, so every group is split across the
ranks; GramReward (group mode) scores through the running `gram serve` at argv[2] and records what each rank
saw and returned."""

import json
import os
import sys

import datasets
import torch.distributed as dist
import trl

from gram_core.models import build_tiny_model, build_tiny_tokenizer
from tasks.serving.reward_functions import GramReward

out, url = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
tokenizer = build_tiny_tokenizer()
gram = GramReward(url=url)
calls = []


def gram_group(prompts, completions, **columns):
    rewards = gram(prompts, completions, **columns)
    calls.append({"prompts": list(prompts), "completions": list(completions), "rewards": rewards})
    return rewards


data = datasets.Dataset.from_dict({"prompt": ["Name a colour.", "Say hi.", "Count to three.", "Name a fruit."]})
config = trl.GRPOConfig(output_dir=os.path.join(out, "trl"), max_steps=2, per_device_train_batch_size=2,
                        num_generations=4, max_completion_length=6, learning_rate=1e-2, use_cpu=True,
                        report_to="none", save_strategy="no", logging_steps=1, seed=0, bf16=False)
trainer = trl.GRPOTrainer(model=build_tiny_model(tokenizer, seed=1), reward_funcs=[gram_group], args=config,
                          train_dataset=data, processing_class=tokenizer)
trainer.train()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"calls": calls, "steps": trainer.state.global_step}, f)
if dist.is_initialized():  # leave the gloo group before exit: a live one can abort the process as it ends
    dist.barrier()
    dist.destroy_process_group()
