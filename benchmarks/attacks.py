"""Hostile clients for the robustness benchmark and tests: a node that answers as the
real ClientApp, then changes its replies before they leave (what a compromised or
broken client can do without touching anyone else's code).

Attacks (on the upload of Fed-ALoRA's decomposed layer, B2 and B1, or on any upload):

- ``count-liar``: claims ``LIE`` training examples, at discovery and in every reply;
- ``scaled``: every uploaded factor multiplied by 9 (B2 B1 by 81 for Fed-ALoRA);
- ``sign-flip``: the first factor of every layer (B2, or lora_A) multiplied by -4, so
  the update it applies points the other way, four times as long.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType

from server.in_process import NodeApp
from strategies.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    NUM_TRAIN_EXAMPLES,
    client_ids,
    keyed,
    to_numpy,
    to_record,
)

ATTACKS = ("none", "count-liar", "scaled", "sign-flip")
LIE = 1_000_000
SCALE, FLIP = 9.0, -4.0
FIRST_FACTORS = (".B2", ".lora_A")


def hostile(app: NodeApp, node_id: int, attack: str) -> NodeApp:
    """``app`` everywhere, except that node ``node_id`` mounts ``attack`` on its replies."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")

    def answer(message: Message, context: Context) -> Message:
        reply = app(message, context)
        if context.node_id != node_id or attack == "none" or reply.has_error():
            return reply
        content, kind = reply.content, message.metadata.message_type
        if attack == "count-liar" and kind == MessageType.QUERY:
            info = content.config_records[CONFIG]
            info[NUM_TRAIN_EXAMPLES] = [LIE] * len(client_ids(info))
        elif kind == MessageType.TRAIN:  # every client the node hosts
            for partition_id in client_ids(message.content.config_records[CONFIG]):
                if attack == "count-liar":
                    content.metric_records[keyed(METRICS, partition_id)][NUM_EXAMPLES] = LIE
                    continue
                key = keyed(ARRAYS, partition_id)
                upload = dict(to_numpy(content.array_records[key]))
                for name, value in upload.items():
                    if attack == "scaled":
                        upload[name] = value * SCALE
                    elif name.endswith(FIRST_FACTORS):
                        upload[name] = value * FLIP
                content.array_records[key] = to_record(upload)
        return reply

    return answer
