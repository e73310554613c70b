# JSON for the in-sandbox programs (python_wrapper.py, dedicated_runtime.py), pasted into
# each where it says `# sandmill: include fastjson.py` (worker/runtimes.py `template`):
# through the C accelerator `_json` that json itself uses, without importing json (and so
# `re`), whose import costs more than everything else a wrapper does; stdlib only.
try:
    import _json

    class _Ctx:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        memo = {}

        @staticmethod
        def parse_constant(name):
            raise ValueError(f"{name} is not valid JSON")

    _scan = _json.make_scanner(_Ctx)

    def _loads(text):
        obj, end = _scan(text, 0)
        if text[end:].strip():
            raise ValueError("extra data after the JSON value")
        return obj

    def _no_default(o):
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    _enc = _json.make_encoder(None, _no_default, _json.encode_basestring, None, ": ", ", ",
                              False, False, False)

    def _dumps(obj):
        return "".join(_enc(obj, 0))
except (ImportError, AttributeError, TypeError):  # another interpreter: the plain way
    import json

    _loads = json.loads

    def _dumps(obj):
        return json.dumps(obj, allow_nan=False)
