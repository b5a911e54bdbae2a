"""What `dogtl bot` says, written for a dog owner: readable class names, percentages, "not
sure" when the best match is below the confidence asked for, and a line for each thing it
cannot read."""

from __future__ import annotations

import re

HINT_TEXT = "I only look at pictures: send me a photo of a dog and I'll tell you its breed."
HINT_STICKER = "Nice sticker! But I can only read real photos: send me a picture of a dog."
HINT_VIDEO = "I can't watch videos or GIFs: send me a still photo of the dog instead."
HINT_OTHER = "I don't know what to do with that: send me a photo of a dog and I'll tell you its breed."
NOT_AN_IMAGE_FILE = ("That file ({name}) is not an image. Send a photo, or an image file "
                     "(JPEG, PNG, GIF, BMP or WebP).")
TOO_BIG = "That file is {size} MB, over my limit of {limit:g} MB. Send it as a photo instead: Telegram makes photos smaller."
TOO_BIG_UNKNOWN = "That file is over my limit of {limit:g} MB. Send it as a photo instead: Telegram makes photos smaller."
UNREADABLE = "Sorry, I couldn't read that file as an image ({reason}). Try sending the picture as a photo."
TOO_MANY_PIXELS = "That image has too many pixels for me to open. Send it as a photo instead: Telegram makes photos smaller."
EMPTY = "That file is empty. Send the picture again as a photo."
DOWNLOAD_FAILED = "Sorry, I couldn't download that from Telegram. Please send it again."
FAILED = "Sorry, something went wrong on my side. Please try again in a moment."


def readable(name: str) -> str:
    """A class name as a person writes it: 'n02085620-Chihuahua' -> 'Chihuahua' (a WordNet id as
    in ImageNet and Stanford Dogs folders), 'german_short-haired_pointer' -> 'german short-haired pointer'."""
    text = re.sub(r"^n\d{8}[-_]", "", str(name)).replace("_", " ")
    return " ".join(text.split()) or str(name)


def with_article(name: str) -> str:
    """'a beagle', 'an Afghan hound'; names that do not start with a letter stay bare."""
    if not name[:1].isalpha():
        return name
    return ("an " if name[0].lower() in "aeiou" else "a ") + name


def percent(p: float) -> str:
    return "over 99%" if p >= 0.995 else f"{max(1, round(p * 100))}%"


def describe(top: list[tuple[str, float]], min_confidence: float) -> str:
    """The reply for one image's top classes (class, probability), best first: 'Most likely a
    beagle (91%); maybe a basset (6%).' Alternatives under 1% are left out. Below
    `min_confidence` for the best class, it says it is not sure and lists the candidates."""
    shown = [f"{with_article(readable(name))} ({percent(p)})" for name, p in top[:1]]
    shown += [f"{with_article(readable(name))} ({percent(p)})" for name, p in top[1:] if p >= 0.01]
    if top[0][1] < min_confidence:
        return (f"I'm not sure about this one. It could be {_or_list(shown)}, but I wouldn't bet on it. "
                "A sharp photo with the dog filling the frame works best.")
    if len(shown) == 1:
        return f"Most likely {shown[0]}."
    return f"Most likely {shown[0]}; maybe {_or_list(shown[1:])}."


def _or_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def start_text(classes: list[str]) -> str:
    names = [readable(c) for c in classes]
    examples = _or_list(sorted({names[0], names[len(names) // 2], names[-1]}, key=names.index))
    return (f"Hi! Send me a photo of a dog and I'll tell you which breed it looks like. I know {len(names)} "
            f"breeds, for example {examples.replace(' or ', ' and ')}.\nSend /help for tips.")


def help_text(max_file_mb: float, min_confidence: float) -> str:
    return ("Send me a photo of one dog, or an image file (JPEG, PNG, GIF, BMP or WebP) up to "
            f"{max_file_mb:g} MB. I answer with the breeds it looks most like and how sure I am, in percent. "
            f"When my best match is under {min_confidence:.0%} I say I'm not sure rather than guess. "
            "A sharp photo with the dog filling the frame works best.\n"
            "I can't read text, stickers or videos.")
