"""`python -m m3ae` and `torchrun -m m3ae`: the `m3ae` command."""

if __name__ == "__main__":
    from m3ae.cli import main

    raise SystemExit(main())
