"""Images laid out for looking at: a prompt matrix's labelled grid, and a seamless tile repeated."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def labelled_grid(
    images: Sequence[Image.Image], columns: int, column_labels: Sequence[str], row_labels: Sequence[str]
) -> Image.Image:
    """`images` row by row under a header of column labels, each row after its label (no label column when
    `row_labels` is empty), as A1111's X/Y plot draws them. Labels wrap to the cell's width."""
    cell_w, cell_h = images[0].size
    rows = -(-len(images) // columns)
    font = ImageFont.load_default(size=max(12, cell_w // 16))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3] * 1.3)
    label_w = cell_w if row_labels else 0
    wrapped_columns = [_wrap(measure, label, font, cell_w) for label in column_labels]
    header_h = line_h * max(len(lines) for lines in wrapped_columns) + line_h // 2
    grid = Image.new("RGB", (label_w + columns * cell_w, header_h + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(wrapped_columns):
        _centred(draw, lines, font, line_h, (label_w + column * cell_w, 0, cell_w, header_h))
    for row, label in enumerate(row_labels):
        lines = _wrap(measure, label, font, label_w)
        _centred(draw, lines, font, line_h, (0, header_h + row * cell_h, label_w, cell_h))
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB"), (label_w + column * cell_w, header_h + row * cell_h))
    return grid


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width * 0.92:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _centred(
    draw: ImageDraw.ImageDraw,
    lines: list[str],
    font: Font,
    line_h: int,
    box: tuple[int, int, int, int],
) -> None:
    x, y, width, height = box
    top = y + (height - line_h * len(lines)) // 2
    for number, line in enumerate(lines):
        left = x + (width - int(draw.textlength(line, font=font))) // 2
        draw.text((left, top + number * line_h), line, fill=INK, font=font)


def tile_preview(image: Image.Image, tiling: str) -> Image.Image:
    """The tile repeated 3 times along each axis it wraps on (3x3 for both): a seam would show at once."""
    across = 3 if tiling in ("x", "both") else 1
    down = 3 if tiling in ("y", "both") else 1
    preview = Image.new(image.mode, (image.width * across, image.height * down))
    for row in range(down):
        for column in range(across):
            preview.paste(image, (column * image.width, row * image.height))
    return preview
