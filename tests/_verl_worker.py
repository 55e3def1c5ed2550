"""Worker for tests/test_verl.py: VeRL's FSDP2 engine on CPU, in a spawned gloo process.

VeRL knows only GPU/NPU platforms: a small CPU platform is registered with
``verl.plugin.platform.set_platform`` before ``verl.workers.engine`` is imported. The engine
loads the model with ``from_pretrained``, so a tiny random Qwen3 is saved to a temporary
directory first. Results go back through a queue as plain lists, keyed by scenario.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import traceback
from typing import Any

import torch

VOCAB, ROWS, MICRO = 37, 6, 2  # 6 sequences per rank, 3 microbatches of 2
CLAMP = 0.5


def _cpu_platform() -> None:
    import types

    from verl.plugin.platform import PlatformBase, set_platform

    class CPUPlatform(PlatformBase):
        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> types.ModuleType:
            return torch.cpu

        def is_available(self) -> bool:
            return True

        def current_device(self) -> Any:
            return "cpu"  # VeRL moves tensors to .to(current_device())

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            pass

        def synchronize(self, device_index: int | None = None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            pass

        def get_device_capability(self, device_index: int = 0) -> tuple[None, None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        def nvtx_range(self, msg: str) -> Any:
            return contextlib.nullcontext()

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    set_platform(CPUPlatform())


def tiny_qwen3() -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config)


def rollout(rank: int) -> dict[str, torch.Tensor]:
    """``ROWS`` sequences: left-padded prompts, right-padded responses; per-row advantages.
    Later rows repeat earlier ones so that microbatches share gradient directions."""
    gen = torch.Generator().manual_seed(100 + rank)
    prompt_len, response_len = 4, 5
    prompts = torch.randint(1, VOCAB, (ROWS, prompt_len), generator=gen)
    responses = torch.randint(1, VOCAB, (ROWS, response_len), generator=gen)
    prompt_mask = torch.ones(ROWS, prompt_len, dtype=torch.long)
    response_mask = torch.ones(ROWS, response_len, dtype=torch.long)
    for i in range(ROWS):
        prompt_mask[i, : i % 3] = 0  # left padding
        response_mask[i, response_len - (i % 2) - (i // 3) :] = 0  # right padding
    prompts[2], responses[2] = prompts[0], responses[0]  # revisits (different microbatch)
    prompt_mask[2], response_mask[2] = prompt_mask[0], response_mask[0]
    input_ids = torch.cat([prompts, responses], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    input_ids = input_ids * attention_mask
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    advantages = torch.randn(ROWS, generator=gen)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "position_ids": position_ids,
        "seq_adv": advantages,
    }


def loss_function(model_output: dict, data: Any, dp_group: Any = None) -> tuple[torch.Tensor, dict]:
    """REINFORCE, summed over each sequence's tokens: ``-Σ_i adv_i Σ_t log p(x_{t+1} | x_≤t)``
    (the last position of a sequence predicts nothing)."""
    log_probs = model_output["log_probs"]
    offsets = log_probs.offsets()
    values = log_probs.values().float()
    lengths = offsets.diff()
    last = torch.zeros_like(values, dtype=torch.bool)
    last[offsets[1:] - 1] = True
    weight = torch.repeat_interleave(data["seq_adv"].float(), lengths).masked_fill(last, 0.0)
    return -(values * weight).sum(), {}


def reference_losses(model: torch.nn.Module, mb: dict) -> torch.Tensor:
    """Each sequence's term of ``loss_function`` computed on padded rows of the HF model."""
    ids, mask, adv = mb["input_ids"], mb["attention_mask"], mb["seq_adv"]
    out = []
    for i in range(ids.shape[0]):
        seq = ids[i][mask[i].bool()][None]
        logits = model(input_ids=seq, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, seq[0, 1:, None])[:, 0]
        out.append(-adv[i].double() * logp.sum().double())
    return torch.stack(out)


def _engine(
    path: str, remove_padding: bool, proma: dict | None, bf16: bool, strategy: str = "fsdp2"
):
    from verl.trainer.config import CheckpointConfig
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.base import EngineRegistry

    import proma_accum.integrations.verl  # noqa: F401  (registers the PROMA engine)

    model_config = HFModelConfig(
        path=path,
        load_tokenizer=False,
        use_remove_padding=remove_padding,
        override_config={"attn_implementation": "sdpa"},
        enable_gradient_checkpointing=True,
    )
    engine = {
        "_target_": "verl.workers.config.FSDPEngineConfig",
        "strategy": strategy,
        "use_torch_compile": False,
        "use_dynamic_bsz": False,
        "micro_batch_size_per_gpu": MICRO,
    }
    if not bf16:
        engine["mixed_precision"] = {"param_dtype": "fp32", "reduce_dtype": "fp32"}
    if proma is not None:
        # What a VeRL config does: fsdp_config._target_ and fsdp_config.proma.
        engine["_target_"] = "proma_accum.integrations.verl.PromaFSDPEngineConfig"
        engine["proma"] = proma
    engine_config = omega_conf_to_dataclass(engine)
    engine_config.use_remove_padding = remove_padding
    optim = FSDPOptimizerConfig(lr=1e-3, clip_grad=1e9)
    # The registry lists cuda/npu only; ask for the CUDA entry, which is the PROMA engine.
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    eng = EngineRegistry.new(
        model_type="language_model",
        backend="fsdp2",
        model_config=model_config,
        engine_config=engine_config,
        optimizer_config=optim,
        checkpoint_config=CheckpointConfig(),
    )
    eng.initialize()
    return eng


def _batch(rank: int, remove_padding: bool):
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    data = TensorDict(rollout(rank), batch_size=[ROWS])
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(
        data,
        use_remove_padding=remove_padding,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=MICRO,
        temperature=1.0,
        calculate_entropy=False,
        use_fused_kernels=False,
    )
    return data


def _full_grads(module: torch.nn.Module) -> dict[str, list]:
    out = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = g.double().tolist()
    return out


def run(rank: int, path: str, remove_padding: bool, proma: dict | None, bf16: bool) -> dict:
    eng = _engine(path, remove_padding, proma, bf16)
    with eng.train_mode():
        eng.optimizer_zero_grad()
        eng.forward_backward_batch(_batch(rank, remove_padding), loss_function)
        out: dict = {"grads": _full_grads(eng.module)}
    acc = getattr(eng, "proma", None)
    out["engine"] = type(eng).__name__
    if acc is not None:
        out["attached_after"] = acc.attached
        out["step_stats"] = acc.stats(flat=True)
    return out


def hydra_config() -> dict:
    """What VeRL's trainer builds from its own YAML with the overrides of docs/verl.md."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    overrides = [
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.fsdp_config._target_="
        "proma_accum.integrations.verl.PromaFSDPEngineConfig",
        "+actor_rollout_ref.actor.fsdp_config.proma.clamp=0.25",
        "+actor_rollout_ref.actor.fsdp_config.proma.exclude=[lm_head.*]",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    ref = omega_conf_to_dataclass(cfg.actor_rollout_ref.ref.fsdp_config)
    return {
        "actor_engine": type(actor.engine).__name__,
        "strategy": actor.engine.strategy,
        "settings": actor.engine.proma_settings(),
        "ref_engine": type(ref).__name__,
    }


def refusal(rank: int, path: str, kind: str) -> dict:
    """The error a refused setup raises, and whether hooks or gradients were left behind."""
    out: dict = {"error": None}
    eng = None
    try:
        if kind == "fsdp1":
            _engine(path, True, {}, False, strategy="fsdp")
        elif kind == "fused_kernels":
            eng = _engine(path, True, {}, False)
            data = _batch(rank, True)
            from verl.utils import tensordict_utils as tu

            tu.assign_non_tensor(data, use_fused_kernels=True)
            with eng.train_mode():
                eng.optimizer_zero_grad()
                eng.forward_backward_batch(data, loss_function)
        elif kind == "bad_setting":
            _engine(path, True, {"clamp": 0.5, "clip": 1.0}, False)
    except Exception as error:
        out["error"] = f"{type(error).__name__}: {error}"
    if eng is not None:
        out["attached_after"] = eng.proma.attached
        out["grads_after"] = len(_full_grads(eng.module))
    return out


def main(rank: int, world: int, port: int, queue: Any, scenarios: list[dict]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    torch.set_num_threads(1)
    results: dict = {}
    try:
        _cpu_platform()
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        with tempfile.TemporaryDirectory() as path:
            if rank == 0:
                tiny_qwen3().save_pretrained(path)
            torch.distributed.barrier()
            shared = [path]
            torch.distributed.broadcast_object_list(shared, src=0)
            for sc in scenarios:
                kind = sc.get("kind", "run")
                if kind == "run":
                    out = run(rank, shared[0], sc["remove_padding"], sc["proma"], sc["bf16"])
                elif kind == "config":
                    out = hydra_config()
                else:
                    out = refusal(rank, shared[0], kind)
                results[sc["name"]] = out
            torch.distributed.barrier()
    except BaseException:
        results["error"] = traceback.format_exc()
    finally:
        queue.put((rank, results))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
