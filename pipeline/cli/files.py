"""files, cat, export, mount: read an image's files straight from the cache.

The image is opened by pipeline/imageopen.py (its layers' indexes from the first tier that
has them, merged), its contents read range by range through the tiers
(pipeline/layerread.py), and written out by pipeline/export.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import stat
import sys
from typing import TYPE_CHECKING, Any

from pipeline.cli.common import EXIT_OK, platform_arg, settings_of, when, where_args
from pipeline.errors import LayerwarmError, UsageError
from pipeline.table import counted, table

if TYPE_CHECKING:
    from pipeline.imageopen import OpenedImage



def _open(args: argparse.Namespace) -> OpenedImage:
    from pipeline.imageopen import open_image
    from pipeline.reference import Reference
    from pipeline.runner import Environment

    try:
        ref = Reference.parse(args.image)
    except LayerwarmError as e:  # a malformed reference: the user's to fix
        raise UsageError(str(e)) from None
    return open_image(ref, platform_arg(args), Environment.from_settings(settings_of(args)),
                      args.pull)


def cmd_files(args: argparse.Namespace) -> int:
    from pipeline.fileindex import without_cyclic_gc

    # Tens of thousands of entries and rows, no cycles among them; the process then exits.
    with without_cyclic_gc(for_good=True):
        return _list(args)


def _list(args: argparse.Namespace) -> int:
    image = _open(args)
    try:
        view = image.view
        start = view.stat(args.path)
        found: list[tuple[str, Any, int]]  # (path, its Node or Entry, link count)
        if start.kind != "dir":
            found = [(start.path, start, start.nlink)]
        elif args.recursive and not args.json:
            # Entries, not Nodes: making a Node per path was a fifth of a long listing.
            found = list(view.listing(start.path))[1:]  # below `start`, not `start` itself
        elif args.recursive:
            found = [(p, n, n.nlink) for p, n in view.walk(start.path)][1:]
        else:
            found = [(p, n, n.nlink) for p, n in
                     ((p, view.stat(p)) for p in (_join(start.path, name)
                                                  for name in view.listdir(start.path)))]
    finally:
        image.close()
    if args.json:
        print(json.dumps([_node_json(path, node) for path, node, _ in found], indent=2))
        return EXIT_OK
    stamp = functools.cache(when)  # files share few mtimes
    rows = [(_filemode(n.kind, n.mode), str(nlink),
             n.uname or str(n.uid), n.gname or str(n.gid), _size(n), stamp(n.mtime),
             ("/" + p) + (f" -> {n.link}" if n.kind == "symlink" else ""))
            for p, n, nlink in found]
    lines = table(("MODE", "LINKS", "OWNER", "GROUP", "SIZE", "MODIFIED", "PATH"), rows,
                  right={1, 4})
    lines.append(counted(len(rows), "entry"))
    sys.stdout.write("\n".join(lines) + "\n")  # one write: a listing may be 10^5 lines
    return EXIT_OK


@functools.cache  # an image has few (kind, mode) pairs
def _filemode(kind: str, mode: int) -> str:
    from pipeline.imageview import st_mode

    return stat.filemode(st_mode(kind, mode))


def cmd_cat(args: argparse.Namespace) -> int:
    image = _open(args)
    out = sys.stdout.buffer
    try:
        for path in args.paths:
            with image.open(path) as f:  # links followed inside the image
                shutil.copyfileobj(f, out, 1 << 20)
        out.flush()
    finally:
        image.close()
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export_dir, export_tar

    if (args.output is None) == (args.dir is None):
        raise UsageError("export: give -o FILE (or -o - for stdout) or --dir DIR")
    image = _open(args)
    try:
        nodes = image.view.walk()
        if args.dir is not None:
            n = export_dir(nodes, image.open, args.dir)
            print(f"{args.image}: {counted(n, 'path')} written below {args.dir}",
                  file=sys.stderr)
        elif args.output == "-":
            export_tar(nodes, image.open, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        else:
            with open(args.output, "wb") as out:
                n = export_tar(nodes, image.open, out)
            print(f"{args.image}: {counted(n, 'member')} written to {args.output}",
                  file=sys.stderr)
    finally:
        image.close()
    return EXIT_OK


def cmd_mount(args: argparse.Namespace) -> int:
    from pipeline.mount import check_fuse, mount

    check_fuse()  # before the image is opened: a machine without FUSE is told at once
    image = _open(args)
    try:
        mount(image, args.mountpoint, foreground=args.foreground)
    finally:
        image.close()
    return EXIT_OK


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _size(node: Any) -> str:
    if node.kind in ("char", "block"):
        return f"{node.devmajor},{node.devminor}"
    return str(node.size)


def _node_json(path: str, n: Any) -> dict[str, Any]:
    return {"path": "/" + path, "type": n.kind, "mode": f"{n.mode & 0o7777:04o}",
            "uid": n.uid, "gid": n.gid, "user": n.uname, "group": n.gname, "size": n.size,
            "mtime": when(n.mtime), "link": n.link or None, "nlink": n.nlink,
            "digest": f"sha256:{n.digest}" if n.digest else None,
            "xattrs": sorted(n.xattrs), "layer": n.layer}


def register(sub: argparse._SubParsersAction) -> None:
    def image_command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("image", metavar="IMAGE", help="image reference, e.g. alpine:3.19")
        p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                       help="platform to pick from multi-platform images (default: this host's)")
        p.add_argument("--pull", choices=("missing", "always", "never"), default="missing",
                       help="when to ask the registry what IMAGE is: missing (only if this "
                            "cache has not resolved it before, e.g. by warm), always, never")
        where_args(p)
        p.set_defaults(all_platforms=False)  # one image: platform_arg picks this host's
        return p

    files = image_command("files", "list an image's files (its merged layers) from the cache")
    files.add_argument("path", nargs="?", default="/", metavar="PATH",
                       help="a directory or file in the image (default /)")
    files.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")
    files.add_argument("--json", action="store_true", help="print the entries as JSON")
    files.set_defaults(func=cmd_files)
    cat = image_command("cat", "write files of an image to stdout, read from the cache")
    cat.add_argument("paths", nargs="+", metavar="PATH", help="a file in the image")
    cat.set_defaults(func=cmd_cat)
    export = image_command("export", "write an image's filesystem as one tar, or as a tree")
    export.add_argument("-o", "--output", metavar="FILE", help="the tar to write ('-': stdout)")
    export.add_argument("--dir", metavar="DIR", help="write the tree below DIR instead")
    export.set_defaults(func=cmd_export)
    mount = image_command("mount", "serve an image's filesystem read-only at MOUNTPOINT (FUSE)")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    mount.add_argument("--foreground", action="store_true",
                       help="stay in the foreground (unmount: fusermount3 -u, or SIGTERM)")
    mount.set_defaults(func=cmd_mount)
