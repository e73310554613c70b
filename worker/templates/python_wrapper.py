# sandmill's wrapper for python3 jobs: load main.py, call main(**args), write the result.
# It runs inside the sandbox, with the job's own interpreter; stdlib only.
# Start-up cost matters here (it is paid by every job): the json package pulls in `re`,
# which costs more than everything else the wrapper does, so JSON goes through the C
# accelerator `_json` that json itself uses; traceback is imported only on the error path.
import sys

# sandmill: include fastjson.py


def _tb(exc=None):
    import traceback

    if exc is not None:
        return "".join(traceback.format_exception_only(exc))
    return traceback.format_exc()


# A lone surrogate cannot be encoded as UTF-8: "backslashreplace" writes it as its JSON
# escape (U+D800 as \ud800; it only ever occurs inside a JSON string here), so the worker
# reads the exact value and says where it is (ResultNotStorable) instead of the wrapper
# crashing.
def _write(name, text):
    with open(name, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(text)


def _fail(name, message, tb=""):
    _write("error.json", _dumps({"name": str(name), "message": str(message), "stack": str(tb)}))
    sys.exit(1)


# The job's dependencies (worker/pydeps): a read-only environment the worker mounted;
# first on sys.path, since a warm interpreter started before PYTHONPATH named it; its .pth
# files processed as site-packages' are.
def _deps():
    import os

    path = os.environ.get("SANDMILL_PYDEPS")
    if path:
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(1, path)
        import site

        site.addsitedir(path)


def _run():
    with open("args.json") as f:
        args = _loads(f.read())
    with open("main.py") as f:
        source = f.read()
    try:
        code = compile(source, "main.py", "exec")
    except SyntaxError as e:
        _fail("SyntaxError", f"line {e.lineno}: {e.msg}", _tb(e))
    module = {"__name__": "__sandmill_main__", "__file__": "main.py"}
    sys.path.insert(0, ".")
    _deps()
    try:
        exec(code, module)
    except BaseException as e:  # noqa: BLE001 - any error at import is the job's error
        tb = _tb()
        sys.stderr.write(tb)
        _fail(type(e).__name__, str(e), tb)
    main = module.get("main")
    if not callable(main):
        _fail("NoMainFunction", "the script defines no main(...) function")
    try:
        result = main(**args)
    except TypeError as e:
        if e.__traceback__ is not None and e.__traceback__.tb_next is None:
            _fail("ArgumentError", f"main() does not take these args: {e}")
        tb = _tb()
        sys.stderr.write(tb)
        _fail(type(e).__name__, str(e), tb)
    except BaseException as e:  # noqa: BLE001
        tb = _tb()
        sys.stderr.write(tb)
        _fail(type(e).__name__, str(e), tb)
    try:
        data = _dumps(result)
    except (TypeError, ValueError, RecursionError) as e:
        _fail("ResultNotSerializable", f"the result of main() is not JSON-serializable: {e}")
    sys.stdout.flush()
    _write("result.json", data)


# sandmill: prepare-once
# A warm interpreter runs everything above once, as __name__ "__sandmill_warm__", and then
# each job's __sandmill_job__() in a fork of it (isolation/zygote.py); a fresh one, this.
def __sandmill_job__():
    _run()


if __name__ != "__sandmill_warm__":
    _run()
