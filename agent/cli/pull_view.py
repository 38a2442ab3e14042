"""What ``node-agent plan`` says about a hub model before anything large moves."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from agent.errors import NodeAgentError
from agent.hub.errors import gb


@dataclass(frozen=True)
class Preview:
    """The variants ``pull`` would fetch for the plan, with sizes where the hub (or card) gives them."""

    ref: str
    offline: bool
    variants: tuple[dict, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        total = [v["bytes"] for v in self.variants]
        return {"ref": self.ref, "offline": self.offline, "variants": list(self.variants),
                "bytes_total": sum(total) if None not in total else None, "notes": list(self.notes)}


def download_preview(ref, settings, host, pins, offline: bool):
    """(plan, preview) for a hub reference; metadata only, or nothing at all when offline."""
    from huggingface_hub import constants

    from agent.cli.hub_cmds import vllm_cpu_for
    from agent.hub.local import hub_for
    from agent.hub.pull import make_plan
    from agent.hub.select import choose, files_for

    offline = offline or constants.HF_HUB_OFFLINE
    hub = None if offline else hub_for(settings)
    remote, result = make_plan(ref, settings, host, pins, hub, vllm_cpu=vllm_cpu_for(settings, host))
    chosen, notes = choose(result, remote.spec, ref.revision, ref.repo)
    variants = []
    for v in chosen:
        listing = remote.listings.get(v.repo)
        size, commit = None, None
        if listing is not None:
            try:
                size = sum(f.size for f in files_for(v, listing, None))
                commit = listing.commit
            except NodeAgentError as exc:
                notes.append(f"{v.repo}: {exc}")
        else:
            src = next((s for s in remote.spec.sources if s.repo == v.repo and s.file == v.file), None)
            size = src.size_bytes if src else None
        variants.append({"engine": v.engine, "repo": v.repo, "revision": v.revision, "commit": commit,
                         "format": v.format, "quant": v.quant, "file": v.file, "bytes": size, "why": v.why})
    return result, Preview(ref.text, hub is None, tuple(variants), (*remote.notes, *notes))


def render_download(p: Preview, console: Console) -> None:
    console.print("[bold]download[/] (what `node-agent pull` fetches for this plan)")
    for v in p.variants:
        at = f"@{v['commit'][:12]}" if v["commit"] else (f"@{v['revision']}" if v["revision"] else "")
        size = gb(v["bytes"]) if v["bytes"] else "size unknown offline"
        console.print(f"  - {v['engine']}: {escape(v['repo'])}{at} {escape(v['file'] or v['format'])}: {size}",
                      highlight=False)
    for note in p.notes:
        console.print(f"  - [dim]{escape(note)}[/]", highlight=False)
    total = p.to_dict()["bytes_total"]
    if total:
        console.print(f"  total {gb(total)}", highlight=False)
