"""One rich console for all commands. When output is piped (CI logs, files) rich would assume
80 columns and squeeze per-layer tables; 140 keeps layer names readable there."""

from rich.console import Console

console = Console()
if not console.is_terminal:
    console = Console(width=140)
