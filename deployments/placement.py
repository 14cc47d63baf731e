"""What each generator replica asks Ray for: the config's CPUs and GPUs, fitted to the cluster.

`configs/serve.yaml` sizes every generator replica for a GPU host of its own (1 GPU, 4 CPUs)
and serves two variants. On a cluster smaller than the variants' minimum replicas ask for,
Ray places what fits and leaves the rest waiting for resources that never come; which
variant waits, the default one included, is up to the order Ray places them in. So with
`fit_to_cluster: true` (the default) the builder asks for what the cluster has, counted
when the application is built:

- no GPU at all: the GPU generators run on CPU;
- fewer GPUs than the minimum replicas ask for: those replicas share the GPUs (Ray's
  fractional GPUs; one GPU box serves both variants of serve.yaml, half a GPU each);
- fewer CPUs than asked for beside the ingress and style embedder: every generator's
  request shrinks in proportion;
- more CPUs per replica than one node holds for it: a replica runs on one node, so one on a
  GPU asks for no more than its share of its GPU node's CPUs (a head node's spare CPUs
  are no use to a replica on a 4-CPU, 1-GPU worker), one on CPU for no more than the
  largest node has;
- an autoscaled variant whose `max_replicas` the room left beside every variant's minimum
  replicas cannot hold: its `max_replicas` comes down to what that room holds. A replica
  Ray cannot place waits for good, the autoscaler counts it as started, and Serve warns
  about it every 30 s in the log.

Each fit is logged as a warning naming what was asked and what is used. A cluster that
adds nodes on demand (KubeRay with an autoscaling GPU group, `configs/rayservice.yaml`)
sets `fit_to_cluster: false`: there what is missing is on its way, and a fit made before
a GPU node joined would keep the generators on CPU for good.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from serve_app.config import AppConfig, VariantConfig

log = logging.getLogger("mrt_serve.app")

INGRESS_CPUS = 0.5  # per ingress replica
STYLE_EMBEDDER_CPUS = 0.5
SMALLEST_CPU_REQUEST = 0.1


@dataclass(frozen=True)
class Placement:
    """The resources one replica of a generator deployment asks Ray for."""

    num_gpus: float
    num_cpus: float
    # the most replicas the autoscaler may start; None: the config's `max_replicas`
    max_replicas: int | None = None


def min_replicas(v: VariantConfig) -> int:
    """Replicas a variant runs at its smallest; one for a deployment that may scale to
    zero, since the replica it scales up to needs room as well."""
    if v.autoscaling_config:
        return max(1, int(v.autoscaling_config.get("min_replicas", 1)))
    return max(1, v.num_replicas) if isinstance(v.num_replicas, int) else 1


def side_cpus(config: AppConfig) -> float:
    """CPUs of the replicas beside the generators: the ingress replicas and the style
    embedder."""
    ingress = config.ingress.get("num_replicas", 1)
    return INGRESS_CPUS * (ingress if isinstance(ingress, int) else 1) + STYLE_EMBEDDER_CPUS


def as_configured(config: AppConfig) -> dict[str, Placement]:
    return {v.name: Placement(v.num_gpus, v.num_cpus) for v in config.variants}


def fit_to_cluster(config: AppConfig,
                   nodes: Sequence[Mapping[str, float]]) -> dict[str, Placement]:
    """Each variant's placement on a cluster of `nodes` (each one's resources, as
    `ray.nodes()` lists them), sized so that every variant's minimum replicas can be placed
    together: in all, and each replica on one node."""
    totals = {key: sum(float(n.get(key, 0.0)) for n in nodes) for key in ("CPU", "GPU")}
    placements = as_configured(config)
    counts = {v.name: min_replicas(v) for v in config.variants}
    placements = _fit_gpus(placements, counts, totals["GPU"])
    side = side_cpus(config)
    cpus = totals["CPU"] - side if totals["CPU"] else None
    if cpus is not None:
        placements = _fit_cpus(placements, counts, cpus)
        placements = _fit_node_cpus(placements, nodes, side)
    return _cap_max_replicas(config, placements, counts, totals["GPU"], cpus)


def _fit_gpus(placements: dict[str, Placement], counts: dict[str, int],
              gpus: float) -> dict[str, Placement]:
    asked = sum(counts[name] * p.num_gpus for name, p in placements.items())
    if not asked or gpus >= asked:
        return placements
    if not gpus:
        log.warning("config asks for %g GPU(s) for its generators' minimum replicas but this Ray "
                    "cluster has no GPU: running them on CPU (expect real models to be far "
                    "slower than real time); set fit_to_cluster: false to wait for GPUs",
                    asked)
        return {name: Placement(0.0, p.num_cpus) for name, p in placements.items()}
    # Replicas per GPU, rounded up, so that each GPU holds whole replicas' shares.
    share = math.ceil(asked / gpus - 1e-9)
    fitted = {name: Placement(_shared(p.num_gpus, share), p.num_cpus)
              for name, p in placements.items()}
    log.warning("config asks for %g GPU(s) for its generators' minimum replicas but this Ray "
                "cluster has %g: up to %d replicas share each GPU (%s); replicas sharing a GPU "
                "take turns on it; set fit_to_cluster: false to wait for more GPUs",
                asked, gpus, share, _describe(fitted, "num_gpus", "GPU"))
    return fitted


def _shared(num_gpus: float, share: int) -> float:
    fraction = num_gpus / share
    if fraction > 1:
        return float(math.floor(fraction))  # Ray takes whole GPUs above one
    return _round_down(fraction, 4)  # Ray counts 1e-4 of a resource: 6 x 1/6 must fit in 1


def _round_down(value: float, digits: int) -> float:
    scale = 10**digits
    return math.floor(value * scale + 1e-9) / scale


def _fit_cpus(placements: dict[str, Placement], counts: dict[str, int],
              cpus: float) -> dict[str, Placement]:
    asked = sum(counts[name] * p.num_cpus for name, p in placements.items())
    if not asked or cpus >= asked:
        return placements
    scale = max(cpus, 0.0) / asked
    fitted = {name: Placement(p.num_gpus,
                              max(SMALLEST_CPU_REQUEST, _round_down(p.num_cpus * scale, 2)))
              for name, p in placements.items()}
    log.warning("config asks for %g CPU(s) for its generators' minimum replicas and this Ray "
                "cluster has %g beside the ingress and style embedder: asking for less (%s)",
                asked, max(cpus, 0.0), _describe(fitted, "num_cpus", "CPU"))
    return fitted


def _fit_node_cpus(placements: dict[str, Placement], nodes: Sequence[Mapping[str, float]],
                   side: float) -> dict[str, Placement]:
    """A replica runs on one node: one on a GPU asks for no more than its share of the CPUs
    of the GPU node with the fewest CPUs per GPU (e.g. 4 CPUs and 1 GPU, a common cloud
    shape), one on CPU for no more than the largest node has. The ingress and style
    embedder may land on any node, so each node's CPUs count without theirs."""
    def beside_side(node: Mapping[str, float]) -> float:
        return max(float(node.get("CPU", 0.0)) - side, 0.0)

    gpu_nodes = [n for n in nodes if n.get("GPU") and "CPU" in n]
    per_gpu = min((beside_side(n) / float(n["GPU"]) for n in gpu_nodes), default=None)
    largest = max((beside_side(n) for n in nodes if "CPU" in n), default=None)
    fitted = {}
    for name, p in placements.items():
        most = per_gpu * p.num_gpus if p.num_gpus and per_gpu is not None else largest
        if most is not None and p.num_cpus > most:
            p = replace(p, num_cpus=max(SMALLEST_CPU_REQUEST, _round_down(most, 2)))
        fitted[name] = p
    if fitted != placements:
        log.warning("config asks for more CPUs per generator replica than a node of this Ray "
                    "cluster holds for it (on a GPU, its share of the CPUs of the GPU node with "
                    "the fewest per GPU; the ingress and style embedder counted on every node): "
                    "asking for less (%s)", _describe(fitted, "num_cpus", "CPU"))
    return fitted


def _cap_max_replicas(config: AppConfig, placements: dict[str, Placement],
                      counts: dict[str, int], gpus: float,
                      cpus: float | None) -> dict[str, Placement]:
    """Each autoscaled variant may grow into the GPUs and CPUs left beside every variant's
    minimum replicas, and no further. Each variant may take all of that room: when two
    grow at once, Ray places whichever asks first."""
    room = {"num_gpus": gpus, "num_cpus": cpus}
    for field in room:
        if room[field] is not None:
            room[field] -= sum(counts[n] * getattr(p, field) for n, p in placements.items())
    fitted = dict(placements)
    for v in config.variants:
        asked = (v.autoscaling_config or {}).get("max_replicas")
        if not isinstance(asked, int):
            continue
        p = placements[v.name]
        more = [math.floor(max(left, 0.0) / getattr(p, field) + 1e-9)
                for field, left in room.items() if left is not None and getattr(p, field)]
        most = counts[v.name] + min(more, default=asked)
        if most < asked:
            fitted[v.name] = replace(p, max_replicas=most)
            log.warning("Generator_%s may scale to %d replicas but this Ray cluster has room "
                        "for %d beside the other variants' minimum replicas: max_replicas %d",
                        v.name, asked, most, most)
    return fitted


def _describe(placements: dict[str, Placement], field: str, unit: str) -> str:
    return ", ".join(f"Generator_{name} {getattr(p, field):g} {unit}"
                     for name, p in placements.items())
