"""`python -m ddpo` is the `ddpo` command (so `accelerate launch -m ddpo run ...` works)."""

from ddpo.cli import main

if __name__ == "__main__":
    main()
