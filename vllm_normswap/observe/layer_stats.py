"""Per-decoder-layer activation statistics, accumulated on the device inside the forward pass.

The model calls ``stats.record(site, x)`` at the five FFN sites. Each call is one opaque custom op,
``torch.ops.normswap.observe_site``, that updates a non-persistent float64 buffer in place (site_stats.py): no
host sync, no Python side effect visible to torch.compile, and under torch.compile the op sees the tensor as the
model materialises it (Inductor cannot fuse it into fp32 intermediates, so compiled counts match eager ones).

What is not counted:
- vLLM's start-up profile and warm-up runs (forward context without attention metadata, outside CUDA-graph
  capture); CUDA-graph capture runs are all padding (``is_padding``) and count nothing;
- padded rows (``forward_context.is_padding``: CUDA-graph batch padding);
- prefix-cache hits: tokens vLLM does not recompute do not pass through the model.

Tensor parallel: sharded sites (act_in, act_out) are recorded on every rank and summed by the exporter;
replicated sites (norm_in, norm_out, ffn_out) only on rank 0. The per-token max |x| at act_out is taken over the
full feature axis with one all-gather of a [tokens, 1] tensor per layer.

No Prometheus code here: this module hands its ``LIVE`` modules to publisher.py, which reads their buffers from
outside the hot path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.library import Library
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_normswap.observe.config import HF_KEY, ObserverConfig
from vllm_normswap.observe.publisher import ensure_publisher
from vllm_normswap.observe.site_stats import HostPlan, SiteLayout, accumulate, accumulate_host, host_plan, warm_host_kernel
from vllm_normswap.registry import SHARDED_SITES, TOKEN_HIST_SITES

LIVE: dict[str, "LayerStats"] = {}  # op key -> module, for the custom op and the publisher (one model/process)


class LayerStats(nn.Module):
    def __init__(self, config: ObserverConfig, layer: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.config, self.layer, self.key = config, layer, f"layer{layer}"
        self.sites = config.sites  # sites this layer observes (all ranks take part, e.g. in the all-gather)
        self.recorded = tuple(s for s in self.sites if s in SHARDED_SITES or tp_rank == 0)  # counted here
        self.gather_token_absmax = tp_size > 1 and "act_out" in self.sites
        self.layouts: dict[str, SiteLayout] = {}
        for site in self.recorded:
            stats = TOKEN_HIST_SITES.get(site, ()) if tp_rank == 0 else ()
            layout = SiteLayout(config.thresholds, {s: len(config.buckets[s]) for s in stats})
            self.layouts[site] = layout
            self.register_buffer(f"state_{site}", torch.zeros(layout.size, dtype=torch.float64), persistent=False)
        for stat, edges in config.buckets.items():
            self.register_buffer(f"edges_{stat}", torch.tensor(edges, dtype=torch.float32), persistent=False)
        self._host_steps = {site: 0 for site in self.recorded}
        self._edges: dict[str, dict[str, torch.Tensor]] = {}  # per site, built on first use
        self._plans: dict[str, HostPlan] = {}  # CPU kernel arguments per site, built on first use
        warm_host_kernel()

    def state(self, site: str) -> torch.Tensor:
        return getattr(self, f"state_{site}")

    def record(self, site: str, x: torch.Tensor) -> None:
        if site not in self.sites:
            return
        token_absmax = None
        if site == "act_out" and self.gather_token_absmax:  # every rank joins the collective
            token_absmax = tensor_model_parallel_all_gather(x.abs().amax(-1, keepdim=True).float(), -1).amax(-1)
        if site not in self.recorded:
            return
        if torch.compiler.is_compiling():  # traced: one opaque op in the graph
            torch.ops.normswap.observe_site(x, self.state(site), token_absmax, self.key, site)
        else:  # eager: the op's body without the dispatcher round trip (~50 us per call on CPU)
            self.accumulate(site, x, self.state(site), token_absmax)

    def accumulate(self, site: str, x: torch.Tensor, state: torch.Tensor, token_absmax: torch.Tensor | None):
        """The body of the custom op (eager code; runs once per call, also in compiled mode)."""
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        valid = None
        if is_forward_context_available():
            ctx = get_forward_context()
            if ctx.attn_metadata is None and not capturing:
                return  # start-up profile / warm-up dummy run
            if ctx.is_padding is not None and x.device.type != "cpu":  # vLLM pads batches only on GPU-like
                valid = (~ctx.is_padding[: x.shape[0]]).float()          # devices; skip a full pass on CPU
        sample_every = self.config.sample_every
        if sample_every > 1 and not capturing:  # host-side sampling: skipped steps cost nothing
            step = self._host_steps[site]
            self._host_steps[site] = step + 1
            if step % sample_every:
                return
            sample_every = 1
        edges = self._edges.get(site)
        if edges is None:  # after the model has moved to its device
            edges = self._edges[site] = {stat: getattr(self, f"edges_{stat}") for stat in self.layouts[site].token_stats}
        if x.device.type == "cpu" and valid is None and sample_every == 1:  # one compiled pass on the host
            plan = self._plans.get(site)
            if plan is None:
                plan = self._plans[site] = host_plan(self.layouts[site], edges)
            accumulate_host(state, self.layouts[site], x, edges, token_absmax, plan)
        else:
            accumulate(state, self.layouts[site], x.detach(), edges, valid, token_absmax, sample_every,
                       sparse_rows=x.device.type == "cpu")


def _observe_site(x: torch.Tensor, state: torch.Tensor, token_absmax: torch.Tensor | None, key: str,
                  site: str) -> None:
    LIVE[key].accumulate(site, x, state, token_absmax)


def _observe_site_fake(x: torch.Tensor, state: torch.Tensor, token_absmax: torch.Tensor | None, key: str,
                       site: str) -> None:
    return None


_LIB = Library("normswap", "FRAGMENT")  # the project's one op namespace; must outlive the op
direct_register_custom_op("observe_site", _observe_site, mutates_args=["state"], fake_impl=_observe_site_fake,
                          target_lib=_LIB)


def observer_config(vllm_config) -> ObserverConfig | None:
    return ObserverConfig.from_hf_value(getattr(vllm_config.model_config.hf_config, HF_KEY, None))


def make_layer_stats(arch, vllm_config, layer: int) -> LayerStats | None:
    """The statistics module of decoder layer ``layer``, or None when the observer is off for it (zero cost)."""
    config = observer_config(vllm_config)
    if config is None:
        return None
    config.check_layers(arch.num_hidden_layers)
    if not config.observes_layer(layer):
        return None
    stats = LayerStats(config, layer, get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    LIVE[stats.key] = stats
    ensure_publisher(config, _model_name(vllm_config), LIVE)  # host side: a thread outside the forward pass
    return stats


def _model_name(vllm_config) -> str:
    name = vllm_config.model_config.served_model_name  # the label vLLM's own metrics use
    return name[0] if isinstance(name, (list, tuple)) else str(name)
