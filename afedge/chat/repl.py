"""The chat loop: interactive (streaming, `you> ` prompt) or non-interactive (a line in, a reply line out).

Commands: /save FILE, /load FILE, /fork [NAME], /switch NAME, /reset, /stats, /help, /quit. In the
non-interactive mode their output goes to stderr, so stdout holds exactly one line per user turn.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import TextIO

from afedge.chat.engine import Conversation
from afedge.chat.statefile import StateFileError

HELP = ("/save FILE  save the conversation state      /load FILE  restore one (same model only)\n"
        "/fork [NAME] branch from here and switch     /switch NAME  go back to a branch\n"
        "/reset  start over   /stats  state bytes, tokens seen, tokens/s   /quit")


class Repl:
    def __init__(self, conv: Conversation, out: TextIO, info: TextIO, interactive: bool) -> None:
        self.branches, self.current = {"main": conv}, "main"
        self.out, self.info, self.interactive = out, info, interactive

    @property
    def conv(self) -> Conversation:
        return self.branches[self.current]

    def command(self, line: str) -> bool:
        """Run one /command; False ends the session."""
        cmd, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        match cmd:
            case "quit" | "exit":
                return False
            case "help":
                self._note(HELP)
            case "reset":
                self.conv.reset()
                self._note(f"[{self.current}] state reset")
            case "stats":
                self._note(json.dumps({"branch": self.current} | {k: round(v, 1) if isinstance(v, float) else v
                                                                   for k, v in self.conv.stats().items()}))
            case "save" if arg:
                self._note(f"saved {self.conv.save(arg)}")
            case "load" if arg:
                try:
                    self.conv.load(arg)
                    self._note(f"[{self.current}] loaded {arg} ({self.conv.counters.tokens_seen} tokens seen)")
                except StateFileError as e:
                    self._note(f"refused: {e} (state unchanged)")
            case "fork":
                name = arg or f"b{len(self.branches)}"
                if name in self.branches:
                    self._note(f"branch '{name}' exists; branches: {', '.join(self.branches)}")
                else:
                    self.branches[name], self.current = self.conv.fork(), name
                    self._note(f"forked '{name}' (branches: {', '.join(self.branches)})")
            case "switch" if arg in self.branches:
                self.current = arg
                self._note(f"on branch '{arg}'")
            case _:
                self._note(f"unknown or incomplete command '{line.strip()}'\n{HELP}")
        return True

    def turn(self, text: str) -> None:
        if self.interactive:
            self.out.write("bot> ")
            self.conv.say(text, on_text=lambda s: (self.out.write(s), self.out.flush()))
            self.out.write("\n")
        else:
            self.out.write(self.conv.say(text) + "\n")
        self.out.flush()

    def run(self, lines: Iterable[str]) -> None:
        for raw in lines:
            line = raw.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
            else:
                self.turn(line)

    def _note(self, msg: str) -> None:
        print(msg, file=self.info, flush=True)


def interactive_lines(prompt: str = "you> ") -> Iterable[str]:
    try:
        import readline  # noqa: F401  (line editing and history when available)
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return
