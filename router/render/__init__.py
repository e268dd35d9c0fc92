"""``python -m router.render``: one YAML -> the files that run the node, and ``--apply`` to a running stack."""
from router.render.cli import main
from router.render.files import ENGINE_STARTSECS, STARTSECS, RenderError, ini_value, render_files, shell_join, templates_dir
from router.render.tree import write_tree

__all__ = ["ENGINE_STARTSECS", "STARTSECS", "RenderError", "ini_value", "main", "render_files", "shell_join", "templates_dir", "write_tree"]
