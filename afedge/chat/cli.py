"""`afedge chat BUNDLE [--runtime R]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_chat(args: argparse.Namespace) -> int:
    from afedge.chat.bundles import open_conversation
    from afedge.chat.repl import Repl, interactive_lines
    interactive = not args.script and sys.stdin.isatty()
    conv, runtime = open_conversation(Path(args.bundle), args.runtime, args.max_new)
    if args.load:
        conv.load(Path(args.load))
    if interactive:
        print(f"afedge chat: {args.bundle} on {runtime} (state {conv.stats()['state_bytes']:,} bytes); "
              f"/help for commands", file=sys.stderr)
    if not interactive:  # a non-UTF-8 byte on stdin becomes U+FFFD in the turn instead of ending the chat
        sys.stdin.reconfigure(errors="surrogateescape")
    repl = Repl(conv, sys.stdout, sys.stderr, interactive)
    repl.run(interactive_lines() if interactive else sys.stdin)
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("chat", help="chat with a bundle; the recurrent state carries the whole conversation")
    s.add_argument("bundle")
    s.add_argument("--runtime", help="artifact or runtime name, or 'torch' (default: the first that runs here)")
    s.add_argument("--max-new", type=int, default=64, help="reply length cap in tokens")
    s.add_argument("--load", help="start from a state file written by /save")
    s.add_argument("--script", action="store_true",
                   help="non-interactive even on a terminal: lines on stdin, one reply line each on stdout")
    s.set_defaults(fn=cmd_chat)
