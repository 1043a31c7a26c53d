"""`dskd cache inspect`: what a cache holds, from its manifest (no shard is opened)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .manifest import committed_shards, load_manifest, shard_totals
from .remote import open_cache_location
from .spec import (
    CHECKSUM,
    HIDDEN_STORAGE,
    TOKEN_OFFSETS,
    TOKEN_OFFSETS_DTYPE,
    TopkStorage,
    layout_fields,
)


def inspect_cache(path: str | Path) -> dict[str, Any]:
    """Teacher, counts, fingerprints, bytes per token per field and dtypes, as a JSON-able dict."""
    path = open_cache_location(path)  # a store URL: its view (the manifest is all we read)
    m = load_manifest(path)
    lay = m["layout"]
    shards = committed_shards(path, m)
    totals = m["totals"] or shard_totals([shards[i] for i in sorted(shards)])
    dtypes = {f.name: str(f.dtype) for f in layout_fields(lay)}
    st = TopkStorage.from_layout(lay)
    if lay["top_k"] and st.logprobs == "q8":
        dtypes["topk_logprobs"] = "q8 (stored as uint8)"
    dtypes["hidden"] = f"{lay['hidden_dtype']} (stored as {HIDDEN_STORAGE[lay['hidden_dtype']]})"
    dtypes[TOKEN_OFFSETS] = str(TOKEN_OFFSETS_DTYPE)
    return {
        "path": str(path),
        "format": m["format"],
        "format_version": m["format_version"],
        "complete": m["complete"],
        "teacher": m["teacher"],
        "shards": {"committed": len(shards), "total": lay["n_shards"], "shard_size": lay["shard_size"]},
        "examples": totals["n_examples"],
        "tokens": totals["n_tokens"],
        "token_rows": totals["n_rows"],
        "hidden_size": lay["hidden_size"],
        "vocab_size": lay["vocab_size"],
        "top_k": lay["top_k"],
        "topk_storage": {"id_bits": st.id_bits, "logprobs": st.logprobs} if lay["top_k"] else None,
        "sampled_targets": lay.get("sampled_targets", 0),
        "sampled_temperature": lay.get("sampled_temperature"),
        "hidden_dtype": lay["hidden_dtype"],
        "dtypes": dtypes,
        "bytes": totals["bytes"],
        "bytes_per_token": totals["bytes_per_token"],
        "head": {k: v for k, v in m["head"].items() if k != CHECKSUM},
        "fingerprints": m["fingerprints"],
    }


def format_inspect(info: dict[str, Any]) -> str:
    """The dict above as a short human-readable report."""
    t = info["teacher"]
    sh = info["shards"]
    lines = [
        (f"cache      {info['path']}  ({info['format']} v{info['format_version']}, "
         f"{'complete' if info['complete'] else 'INCOMPLETE'})"),
        (f"teacher    {t.get('name')}  [{t.get('architecture')}]  D_t={info['hidden_size']} "
         f"V={info['vocab_size']}  backend={t.get('backend')}"),
        (f"contents   {info['examples']:,} examples, {info['tokens']:,} tokens "
         f"({info['token_rows']:,} token rows), {sh['committed']}/{sh['total']} shards "
         f"of {sh['shard_size']} examples"),
        (f"fields     hidden {info['hidden_dtype']}, top-k {info['top_k']}"
         + (f" ({ts['id_bits']}-bit ids, {ts['logprobs']} log-probs)"
            if (ts := info.get("topk_storage")) else "")
         + (f", sampled targets {info['sampled_targets']} draws at temperature "
            f"{info['sampled_temperature']:g}" if info.get("sampled_targets") else "") + ", "
         f"{info['bytes'] / 2**20:,.1f} MiB in shards"),
        "",
        f"{'field':<16}{'dtype':<28}{'bytes/token':>12}",
    ]
    bpt = info["bytes_per_token"]
    for name in list(info["dtypes"]) + ["examples"]:
        if name in bpt:
            lines.append(f"{name:<16}{info['dtypes'].get(name, 'arrow'):<28}{bpt[name]:>12.1f}")
    lines.append(f"{'total':<16}{'':<28}{bpt.get('total', 0):>12.1f}")
    lines += ["", "fingerprints"]
    lines += [f"  {k:<16}{v}" for k, v in info["fingerprints"].items()]
    return "\n".join(lines)
