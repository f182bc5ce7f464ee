"""What each rule moves per client per layer, written out independently of the code
(../shared/design/algorithms.md and each strategy's docstring)."""


def floats_per_layer(strategy: str, direction: str, rank: int, ranks: list[int],
                     d_out: int, d_in: int, d_m: int, before_first_aggregate: bool) -> int:
    """Floats one client of ``rank`` sends ("up") or receives ("down") for one layer.

    ``ranks`` are the ranks of every client in the last aggregate (FLoRA's stack).
    """
    both = rank * (d_in + d_out)
    up = {"fedalora": d_out * rank, "fedalora-hetero": d_out * rank + rank * d_m,
          "fedit": both, "zeropad": both, "hetlora": both, "flexlora": both, "flora": both,
          "ffa-lora": d_out * rank, "fedsa-lora": rank * d_in, "local": 0}
    down = {**up, "fedalora-hetero": d_out * d_m,
            "zeropad": max(ranks) * (d_in + d_out), "hetlora": max(ranks) * (d_in + d_out),
            "flora": 0 if before_first_aggregate else sum(ranks) * (d_in + d_out)}
    return (up if direction == "up" else down)[strategy]
