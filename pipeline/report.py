"""What `warm` and `plan` print at the end: a table for people, JSON for programs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.errors import layer_reason
from pipeline.progress import human_bytes
from pipeline.table import counted, table

if TYPE_CHECKING:  # annotations only: `status` imports this module for source_label
    from pipeline.layer import LayerResult, LayerSpec, Source
    from pipeline.plan import Plan  # without the runner, the registry client and requests
    from pipeline.runner import WarmReport

# How a source reads in tables: "link" says why nothing was fetched.
SOURCE_LABELS = {"link": "disk (shared by diff_id)"}


def source_label(source: str | None) -> str | None:
    return SOURCE_LABELS.get(source, source) if source else source


def warm_totals(report: WarmReport) -> dict[str, int]:
    results = report.results
    return {
        "layers": len(results),
        "failed": sum(1 for r in results if not r.ok),
        "cache_hits": sum(1 for r in results if r.source == "disk"),
        "shared_by_diff_id": sum(1 for r in results if r.source == "link"),
        "from_remote": sum(1 for r in results if r.source == "remote"),
        "from_registry": sum(1 for r in results if r.source == "registry"),
        "bytes_from_registry": report.bytes_from("registry"),
        "bytes_from_remote": report.bytes_from("remote"),
        "images_failed": len(report.plan.failures),
    }


def warm_text(report: WarmReport) -> str:
    rows = [
        (
            r.layer.digest.short,
            human_bytes(r.layer.size),
            human_bytes(r.uncompressed_size) if r.uncompressed_size is not None else "-",
            source_label(r.source) or "FAILED",
            f"{r.seconds:.2f}",
        )
        for r in report.results
    ]
    header = ("LAYER", "COMPRESSED", "UNCOMPRESSED", "FROM", "SECONDS")
    lines = table(header, rows, right={1, 2, 4}) if rows else ["no layers"]
    t = warm_totals(report)
    lines.append(
        f"{counted(t['layers'], 'layer')}: {t['from_registry']} from registry "
        f"({human_bytes(t['bytes_from_registry'])}), {t['from_remote']} from remote "
        f"({human_bytes(t['bytes_from_remote'])}), {counted(t['cache_hits'], 'cache hit')}, "
        f"{t['failed']} failed"
        + (f", {t['shared_by_diff_id']} shared by diff_id (no fetch)"
           if t["shared_by_diff_id"] else "")
    )
    lines += images_failed_lines(report.plan)
    return "\n".join(lines)


def images_failed_lines(plan: Plan) -> list[str]:
    """The summary's word on images that gave no layers: stderr has why, stdout says which.

    Without it a run whose only image failed reads "no layers ... 0 failed" on stdout.
    """
    if not plan.failures:
        return []
    refs = ", ".join(str(f.ref) for f in plan.failures)
    return [f"{counted(len(plan.failures), 'image')} failed: {refs}"]


def failure_lines(report: WarmReport) -> list[str]:
    out = [f"error: {f.ref}: {f.error}" for f in report.plan.failures]
    out += [layer_error_line(str(r.layer.digest), r.error or "")
            for r in report.results if not r.ok]
    return out


def layer_error_line(digest: str, reason: str, target: str | None = None) -> str:
    """`error: layer DIGEST: reason` (`(target)` after the digest on a fleet), the layer
    named once (`layer_reason`)."""
    where = f" ({target})" if target else ""
    return f"error: layer {digest}{where}: {layer_reason(digest, reason)}"


def _layer_json(layer: LayerSpec) -> dict[str, Any]:
    return {
        "digest": str(layer.digest),
        "diff_id": str(layer.diff_id),
        "media_type": layer.media_type,
        "compressed_size": layer.size,
    }


def _result_json(r: LayerResult) -> dict[str, Any]:
    return {
        **_layer_json(r.layer),
        "uncompressed_size": r.uncompressed_size,
        "source": r.source,
        "seconds": round(r.seconds, 3),
        "published": r.published,
        "error": r.error,
        "shared_from": str(r.shared_from) if r.shared_from else None,
    }


def _images_json(plan: Plan) -> list[dict[str, Any]]:
    return [
        {
            "ref": str(img.ref),
            "manifest_digest": str(img.manifest_digest),
            "platform": str(img.platform) if img.platform else None,
            "layers": [str(x.digest) for x in img.layers],
        }
        for img in plan.images
    ]


def warm_json(report: WarmReport) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "images": _images_json(report.plan),
        "image_failures": [{"ref": f.ref, "error": f.error} for f in report.plan.failures],
        "layers": [_result_json(r) for r in report.results],
        "totals": warm_totals(report),
    }


def plan_json(plan: Plan, where: dict[LayerSpec, Source | None]) -> dict[str, Any]:
    unique = plan.layers
    return {
        "images": _images_json(plan),
        "image_failures": [{"ref": f.ref, "error": f.error} for f in plan.failures],
        "layers": [{**_layer_json(x), "tier": where[x]} for x in unique],
        "bytes_to_fetch": sum(x.size for x in unique if where[x] is None),
    }


def plan_text(plan: Plan, where: dict[LayerSpec, Source | None]) -> str:
    unique = plan.layers
    rows = [
        (x.digest.short, human_bytes(x.size), source_label(where[x]) or "registry",
         str(len(x.sources)))
        for x in unique
    ]
    lines = [f"{counted(len(plan.images), 'image')}, {counted(len(unique), 'unique layer')}"]
    if rows:
        lines += table(("LAYER", "COMPRESSED", "TIER", "REPOS"), rows, right={1})
    to_fetch = [x for x in unique if where[x] is None]
    nbytes = human_bytes(sum(x.size for x in to_fetch))
    lines.append(f"to fetch from registry: {counted(len(to_fetch), 'layer')}, {nbytes}")
    lines += images_failed_lines(plan)
    return "\n".join(lines)
