# sandmill's wrapper for python3 jobs: load main.py, call main(**args), write the result.
# It runs inside the sandbox, with the job's own interpreter; stdlib only.
# traceback is imported only on the error path: importing it costs more than the whole
# wrapper otherwise does.
import json
import sys


def _tb(exc=None):
    import traceback

    if exc is not None:
        return "".join(traceback.format_exception_only(exc))
    return traceback.format_exc()


def _fail(name, message, tb=""):
    with open("error.json", "w") as f:
        json.dump({"name": name, "message": message, "stack": tb}, f)
    sys.exit(1)


def _run():
    with open("args.json") as f:
        args = json.load(f)
    with open("main.py") as f:
        source = f.read()
    try:
        code = compile(source, "main.py", "exec")
    except SyntaxError as e:
        _fail("SyntaxError", f"line {e.lineno}: {e.msg}", _tb(e))
    module = {"__name__": "__sandmill_main__", "__file__": "main.py"}
    sys.path.insert(0, ".")
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
        data = json.dumps(result)
    except (TypeError, ValueError) as e:
        _fail("ResultNotSerializable", f"the result of main() is not JSON-serializable: {e}")
    sys.stdout.flush()
    with open("result.json", "w") as f:
        f.write(data)


_run()
