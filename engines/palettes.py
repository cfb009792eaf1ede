"""Named retro palettes for pixel art, as data (hex colours, in each palette's customary order)."""

from __future__ import annotations

PALETTES: dict[str, tuple[str, ...]] = {
    "pico-8": (
        "000000", "1d2b53", "7e2553", "008751", "ab5236", "5f574f", "c2c3c7", "fff1e8",
        "ff004d", "ffa300", "ffec27", "00e436", "29adff", "83769c", "ff77a8", "ffccaa",
    ),
    "nes": (
        "000000", "fcfcfc", "f8f8f8", "bcbcbc", "7c7c7c", "a4e4fc", "3cbcfc", "0078f8", "0000fc", "b8b8f8",
        "6888fc", "0058f8", "0000bc", "d8b8f8", "9878f8", "6844fc", "4428bc", "f8b8f8", "f878f8", "d800cc",
        "940084", "f8a4c0", "f85898", "e40058", "a80020", "f0d0b0", "f87858", "f83800", "a81000", "fce0a8",
        "fca044", "e45c10", "881400", "f8d878", "f8b800", "ac7c00", "503000", "d8f878", "b8f818", "00b800",
        "007800", "b8f8b8", "58d854", "00a800", "006800", "b8f8d8", "58f898", "00a844", "005800", "00fcfc",
        "00e8d8", "008888", "004058", "787878",
    ),
    "game-boy": ("0f380f", "306230", "8bac0f", "9bbc0f"),
    "endesga-32": (
        "be4a2f", "d77643", "ead4aa", "e4a672", "b86f50", "733e39", "3e2731", "a22633",
        "e43b44", "f77622", "feae34", "fee761", "63c74d", "3e8948", "265c42", "193c3e",
        "124e89", "0099db", "2ce8f5", "ffffff", "c0cbdc", "8b9bb4", "5a6988", "3a4466",
        "262b44", "181425", "ff0044", "68386c", "b55088", "f6757a", "e8b796", "c28569",
    ),
    "sweetie-16": (
        "1a1c2c", "5d275d", "b13e53", "ef7d57", "ffcd75", "a7f070", "38b764", "257179",
        "29366f", "3b5dc9", "41a6f6", "73eff7", "f4f4f4", "94b0c2", "566c86", "333c57",
    ),
    "cga": ("000000", "55ffff", "ff55ff", "ffffff"),
    "grayscale-4": ("000000", "555555", "aaaaaa", "ffffff"),
}  # fmt: skip


def palette_rgb(name: str) -> list[tuple[int, int, int]]:
    return [(int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)) for c in PALETTES[name]]
