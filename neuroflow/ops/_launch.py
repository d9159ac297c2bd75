"""Small integer helpers the launchers share."""


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division for grid sizes."""
    return -(-a // b)
