"""MMICL-style declared images and references (Zhao et al., 2023): `Image 0 is <image0>` declares the prompt's first
medium where the declaration stands; a later `<image0>` in the text refers back to it.

The model sees a declaration as the ordinary `<image>` placeholder, and a reference as its own token `<imageK>` (one
added token per K < `FlamingoConfig.num_image_references`); the masking rule then lets the tokens at and after a
reference see image K until the next image or reference (`model/xattn.compute_media_index`).
"""

from __future__ import annotations

import re
from typing import Optional

from .config import MEDIA_TOKEN

# (ASCII digits: `\d` and int() take any script's, so `<image٣>` read as a badly written `<image3>`)
DECLARATION = re.compile(r"Image\s+([0-9]+)\s+is\s+(<image([0-9]+)>)")  # group 2: the tag that stands for the image
REFERENCE = re.compile(r"<image([0-9]+)>")


def reference_token(k: int) -> str:
    """The token of a reference to image k: `<imagek>`."""
    return f"<image{k}>"


def check_reference_index(digits: str, num_references: int) -> int:
    """The image index `digits` of a tag `<image{digits}>`, checked against a model with `num_references` reference
    tokens (`<image0>` ... `<image{num_references - 1}>`): ValueError for an index it has no token for, or one with
    leading zeros (`<image01>`, no token either). A prompt (`resolve_declarations`) and training text
    (`flamingo.data.sequence.check_references`) refuse the same tags: unrefused, such a tag is read as the characters
    `<`, `image`, `2`, `>`, and a model trained on it learns to write them."""
    k = int(digits)
    if digits != str(k):
        raise ValueError(f"<image{digits}>: image indices have no leading zeros (<image{k}>)")
    if k >= num_references:
        raise ValueError(f"<image{k}>: the model has reference tokens for images 0-{num_references - 1}"
                         if num_references else f"<image{k}>: the model has no image reference tokens "
                         "(FlamingoConfig.num_image_references is 0)")
    return k


def resolve_declarations(text: str, num_media: int, num_references: int) -> str:
    """A declared-image prompt -> the model's text: each declaration's `<imagek>` becomes `<image>` (where image k
    goes), each later `<imagek>` stays a reference token.

    Clear errors: a plain `<image>` among declarations, a declaration out of order (image k must be the k-th
    declared), a duplicate declaration, a reference to an image not declared before it, more declarations than media
    (or fewer), an image index the model has no reference token for, and an index with leading zeros."""
    if MEDIA_TOKEN in text:
        raise ValueError(f"a declared-image prompt places its media with `Image k is <imagek>`, not {MEDIA_TOKEN}: "
                         f"{text[:120]!r}")
    declarations = {m.start(2): m for m in DECLARATION.finditer(text)}
    declared: set[int] = set()
    out, end = [], 0
    for ref in REFERENCE.finditer(text):
        k = check_reference_index(ref.group(1), num_references)
        declaration = declarations.get(ref.start())
        if declaration is not None:
            if declaration.group(1) != str(k):
                raise ValueError(f"{declaration.group(0)!r} declares image {declaration.group(1)} with <image{k}>")
            if k in declared:
                raise ValueError(f"image {k} is declared twice")
            if k != len(declared):
                raise ValueError(f"image {k} is declared before image {len(declared)}: declare images in order")
            if k >= num_media:
                raise ValueError(f"the prompt declares image {k} but {num_media} image(s)/video(s) were given")
            declared.add(k)
            out.append(text[end:ref.start()] + MEDIA_TOKEN)
        else:
            if k not in declared:
                raise ValueError(f"<image{k}> refers to image {k} before any `Image {k} is <image{k}>` declares it")
            out.append(text[end:ref.end()])
        end = ref.end()
    if len(declared) != num_media:
        raise ValueError(f"the prompt declares {len(declared)} image(s) but {num_media} image(s)/video(s) were "
                         "given")
    return "".join(out) + text[end:]


def unshown_reference(text: str, shown: int, num_references: int) -> Optional[str]:
    """An error naming the first reference in `text` to an image not shown before it (`shown`: how many images the
    text follows), or None. A conversation's question may name an image it has shown (`What colour is <image0>?`, as
    MMICL's conversations write it), never a later one. Only a tag the model has a token for is a reference
    (k < `num_references`, no leading zero): any other `<imagek>` is the characters it is spelled with."""
    for ref in REFERENCE.finditer(text):
        digits = ref.group(1)
        k = int(digits)
        if digits == str(k) and shown <= k < num_references:
            images = ("no image" if shown == 0 else "only image 0" if shown == 1 else f"only images 0-{shown - 1}")
            return (f"<image{k}> refers to image {k}, but the conversation shows {images} before it: a reference "
                    "names an image shown at or before it")
    return None
