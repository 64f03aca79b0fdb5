"""``python -m pmod_convert.cli``: the same CLI, e.g. for ``accelerate launch -m pmod_convert.cli finetune ...``.

The package ``__init__`` imports every module here to register commands, this one included (while it is
still initialising), so the app is looked up and run only when this file executes as ``__main__``.
"""

if __name__ == "__main__":
    from pmod_convert.cli import main

    main()
