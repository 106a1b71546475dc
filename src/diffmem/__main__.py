"""``python -m diffmem`` (and ``torchrun ... -m diffmem``): the command line."""

from diffmem.cli import main

if __name__ == "__main__":
    main()
