from jobs.cli import main

if __name__ == "__main__":  # vLLM's engine core re-imports __main__ when it spawns
    main()
