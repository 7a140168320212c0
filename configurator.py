"""
nanoGPT-style configuration: a script's settings are plain globals with defaults; then

    python train.py config/persian_qa.py --batch_size=4 --learning_rate=1e-4

runs the config file (plain Python assigning some of those globals), then applies each --key=value.
Values are read as Python literals (4, 1e-4, True, "nf4", ('q_proj','v_proj')); anything else stays a string.
A key the script does not have is an error that names the closest ones: a typo must never be silently ignored.
"""

import ast
import difflib
import sys


def _check_key(key, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(defaults))}"
        raise SystemExit(f"error: unknown config key {key!r} in {where}{hint}")


def _parse(value, default):
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare word such as nf4 or out/run1
    if default is not None and isinstance(default, bool) != isinstance(parsed, bool):
        raise SystemExit(f"error: expected True or False, got {value!r}")
    if isinstance(default, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
        parsed = float(parsed)
    return parsed


def configure(defaults, argv=None):
    """defaults: the script's settings dict. Returns a new dict with the config file and --key=value applied."""
    cfg = dict(defaults)
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("--"):
            try:
                source = open(arg, encoding="utf-8").read()
            except OSError:
                raise SystemExit(f"error: config file {arg!r} not found (configs live in config/)")
            scope = {}
            try:
                code = compile(source, arg, "exec")
            except SyntaxError as e:
                raise SystemExit(f"error: config file {arg!r} line {e.lineno}: {e.msg} "
                                 f"(a config file is Python: key = value, one per line)")
            exec(code, scope)  # a config file is Python we wrote ourselves
            for key, value in scope.items():
                if not key.startswith("_") and not callable(value) and not hasattr(value, "__file__"):
                    _check_key(key, defaults, arg)
                    cfg[key] = value
        else:
            key, sep, value = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"error: expected --key=value, got {arg!r}")
            _check_key(key, defaults, "the command line")
            cfg[key] = _parse(value, defaults[key])
    return cfg
