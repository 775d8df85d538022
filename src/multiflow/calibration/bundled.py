"""The bundled calibration set: photographs shipped inside installed packages, with questions.

No download: every image is a file inside scikit-image (`skimage/data/`) or matplotlib
(`mpl-data/sample_data/`). The questions and answers were written by looking at each picture;
facts that the picture alone does not show (who, where) come from the package's own
description of the image. Licences are as the packages state them (scikit-image: the
docstring of each `skimage.data` function; matplotlib states none for its sample data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BundledImage:
    """One image file inside an installed package and the questions asked about it."""

    name: str
    package: str          # distribution name, as pip knows it
    resource: str         # file name inside the package's data folder
    licence: str          # as the package states it
    qa: tuple[tuple[str, str], ...]


_SKIMAGE = "scikit-image"
_MATPLOTLIB = "matplotlib"

BUNDLED_IMAGES: tuple[BundledImage, ...] = (
    BundledImage("astronaut", _SKIMAGE, "astronaut.png", "public domain (NASA; no known copyright restrictions)", (
        ("What is the person in this photo wearing?", "An orange spacesuit."),
        ("Who is shown in this portrait?", "The astronaut Eileen Collins."),
        ("What flag is in the background on the left?", "The flag of the United States."),
        ("What is the model standing on the right?", "A model of the Space Shuttle."),
        ("What is the round black object in the lower right corner?", "A space helmet with a dark visor."),
    )),
    BundledImage("camera", _SKIMAGE, "camera.png", "CC0 (photographer Lav Varshney)", (
        ("What is the man doing?", "He is looking through a camera mounted on a tripod."),
        ("Is this photo in colour?", "No, it is black and white."),
        ("What is the camera standing on?", "A tripod."),
        ("What is the man wearing?", "A dark coat."),
        ("Is the photo taken indoors or outdoors?", "Outdoors, on a grass field with buildings in the distance."),
    )),
    BundledImage("chelsea", _SKIMAGE, "chelsea.png", "CC0 (photographer Stefan van der Walt)", (
        ("What animal is this?", "A cat."),
        ("What colour are the cat's eyes?", "Green."),
        ("What colour is the cat's nose?", "Pink."),
        ("What pattern does the cat's fur have?", "Brown tabby stripes."),
    )),
    BundledImage("coffee", _SKIMAGE, "coffee.png", "CC0 (photographer Rachel Michetti)", (
        ("What drink is in the cup?", "Coffee, an espresso."),
        ("What colour is the cup?", "Red on the outside and white on the inside."),
        ("What lies on the saucer next to the cup?", "A metal spoon."),
        ("What is the cup standing on?", "A red saucer on a wooden table."),
    )),
    BundledImage("coins", _SKIMAGE, "coins.png",
                 "no known copyright restrictions (Brooklyn Museum collection)", (
        ("What objects are shown in this picture?", "Ancient coins laid out in rows."),
        ("How many rows of coins are there?", "Four."),
        ("Is this photo in colour?", "No, it is grayscale."),
        ("Where do these coins come from?", "They are Greek coins from Pompeii."),
    )),
    BundledImage("rocket", _SKIMAGE, "rocket.jpg", "public domain (released by SpaceX)", (
        ("What stands in the middle of the picture?", "A rocket on its launch pad."),
        ("What are the tall structures around the rocket?", "Metal lattice towers."),
        ("What colour is the sky?", "Dark blue: it is twilight."),
        ("Which rocket is this?", "A SpaceX Falcon 9 carrying the DSCOVR satellite."),
    )),
    BundledImage("hubble_deep_field", _SKIMAGE, "hubble_deep_field.jpg", "public domain (NASA)", (
        ("What does this image show?", "Many distant galaxies in deep space."),
        ("What colour is the background?", "Black."),
        ("Which telescope took this picture?", "The Hubble Space Telescope."),
    )),
    BundledImage("immunohistochemistry", _SKIMAGE, "ihc.png", "no known copyright restrictions", (
        ("What kind of image is this?", "A microscope image of stained tissue."),
        ("Which colours does the staining show?", "Brown and blue."),
        ("What tissue is shown?", "Glands of the colon."),
    )),
    BundledImage("text", _SKIMAGE, "text.png", "public domain (from Wikipedia)", (
        ("What is written on the paper?", "Mathematical formulas."),
        ("Is the writing printed or handwritten?", "Handwritten."),
        ("Is this photo in colour?", "No, it is grayscale."),
    )),
    BundledImage("retina", _SKIMAGE, "retina.jpg", "CC0 1.0 (Mikael Häggström, via Wikimedia Commons)", (
        ("What does this image show?", "The retina at the back of a human eye."),
        ("What are the dark red branching lines?", "Blood vessels."),
        ("What is the bright round spot on the left?", "The optic disc."),
        ("Which eye is photographed?", "The left eye."),
    )),
    BundledImage("horse", _SKIMAGE, "horse.png", "CC0 (Andreas Preuss, via openclipart)", (
        ("What animal is shown?", "A horse."),
        ("Is this a photograph?", "No, it is a black silhouette drawing on a white background."),
        ("Which way is the horse facing?", "To the right."),
    )),
    BundledImage("brick", _SKIMAGE, "brick.png", "CC0 (from CC0Textures)", (
        ("What does this picture show?", "A brick wall."),
        ("Do the rows of bricks run horizontally or vertically?", "Vertically."),
        ("Is this photo in colour?", "No, it is grayscale."),
    )),
    BundledImage("grass", _SKIMAGE, "grass.png", "CC0 (from DeviantArt user linolafett)", (
        ("What does this picture show?", "A close-up of grass."),
        ("Is this photo in colour?", "No, it is grayscale."),
    )),
    BundledImage("gravel", _SKIMAGE, "gravel.png", "CC0 (from CC0Textures)", (
        ("What does this picture show?", "Gravel: many small stones."),
        ("Is this photo in colour?", "No, it is grayscale."),
    )),
    BundledImage("grace_hopper", _MATPLOTLIB, "grace_hopper.jpg",
                 "no licence stated by matplotlib; the file's JPEG comment names its source as "
                 "Wikimedia Commons File:Grace_Hopper.jpg, and matplotlib added it as a public-domain image", (
        ("Who is this?", "Grace Hopper, a United States Navy officer and computer scientist."),
        ("What is she wearing?", "A dark navy uniform with an officer's cap."),
        ("Does she wear glasses?", "Yes."),
        ("What flag is behind her?", "The flag of the United States."),
        ("What does her name tag say?", "COMO HOPPER."),
    )),
)


def image_path(image: BundledImage) -> Path:
    """The installed file; ModuleNotFoundError when its package is not installed."""
    if image.package == _MATPLOTLIB:
        from matplotlib import cbook

        return Path(cbook.get_sample_data(image.resource, asfileobj=False))
    from importlib.resources import files

    return Path(str(files("skimage.data") / image.resource))


def describe() -> str:
    """One paragraph: each image, its package and its licence."""
    parts = [f"{im.name} ({im.package}, {im.licence})" for im in BUNDLED_IMAGES]
    total = sum(len(im.qa) for im in BUNDLED_IMAGES)
    return (f"Bundled calibration set: {len(BUNDLED_IMAGES)} images that ship inside installed packages "
            f"(scikit-image's skimage/data, matplotlib's mpl-data/sample_data), with {total} hand-written "
            f"questions and answers: " + "; ".join(parts) + ". All are photographs (hubble_deep_field through "
            "a telescope, immunohistochemistry through a microscope, retina of the back of an eye) except "
            "horse, a silhouette drawing; licences are as each package states them.")
