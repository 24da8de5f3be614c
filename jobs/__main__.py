import sys

# `plan` and `slots` run with the host's python3 before any venv exists: dispatched here, without click
_STDLIB_COMMANDS = ("plan", "slots")

if __name__ == "__main__":  # vLLM's engine core re-imports __main__ when it spawns
    if sys.argv[1:2] and sys.argv[1] in _STDLIB_COMMANDS:
        from jobs.runs import plan, slots

        sys.exit({"plan": plan.main, "slots": slots.main}[sys.argv[1]](sys.argv[2:]))
    from jobs.cli import main

    main()
