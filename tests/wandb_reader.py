"""Read an offline wandb run (<dir>/wandb/offline-run-*/run-*.wandb) back: its history rows and config.

The file is wandb's transaction log: a 7-byte header (":W&B", magic, version), then LevelDB-style log
blocks of 32 KiB holding records (crc32 4 bytes, length 2, type 1: full / first / middle / last), each a
protobuf `Record` from wandb.proto.wandb_internal_pb2. wandb ships no reader for it any more.
"""

import glob
import json
import os
import struct

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(path: str):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_offline_run(root: str) -> dict:
    """{"history": [{key: value}], "config": {key: value}, "files": [...]} of the one offline run under root."""
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = glob.glob(os.path.join(root, "wandb", "offline-run-*", "run-*.wandb"))
    history, config = [], {}
    for payload in _payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind in ("config", "run"):
            for item in (record.config if kind == "config" else record.run.config).update:
                config[item.key] = json.loads(item.value_json)
    files = [os.path.relpath(p, os.path.dirname(path)) for p in glob.glob(os.path.join(os.path.dirname(path), "files", "**", "*"), recursive=True)]
    return {"history": history, "config": config, "files": files}
