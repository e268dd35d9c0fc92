"""``python -m router.render``: one YAML -> the files that run the node."""
from router.render.supervisord import (STARTSECS, RenderError, ini_value, main, render_files, shell_join, templates_dir,
                                       write_tree)

__all__ = ["STARTSECS", "RenderError", "ini_value", "main", "render_files", "shell_join", "templates_dir", "write_tree"]
