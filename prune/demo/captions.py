"""Web-like captions for the web-like demo pool: most describe the image, some name another
class, some say nothing (file names, shop boilerplate, empty, keyword spam).

Pure functions of (label, pixels, kind, rng): the same arguments and the same generator state
give the same text. Nothing here reads the clock or relies on hash order, so a pool built from
the same seed is byte-reproducible.

What a describing caption says is taken from the image itself: a class noun or a synonym of it
(sneaker, trainer, running shoe ...), and, in some captions, a tone word from the mean brightness
of the object's pixels (dark/grey/light) and a texture word from how much neighbouring object
pixels differ (plain/patterned). Fashion-MNIST stores its photos inverted (a bright object on
black), and the words say what these pixels show, which is what an image model sees.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from prune.demo.fashion_mnist import CLASS_NAMES

# caption kinds, recorded per sample as `caption_kind` (for evaluation only)
DESCRIBES = "describes"  # names the sample's own class, with what the pixels show
WRONG = "wrong"  # a plausible description of another class (`caption_label` names it)
NOISE = "noise"  # a file name or shop boilerplate ("IMG_2031.jpg", "free shipping")
EMPTY = "empty"  # "" (img2dataset writes an empty .txt; the pipeline reads it as no caption)
SPAM = "spam"  # hundreds of words of keyword stuffing
CAPTION_KINDS = (DESCRIBES, WRONG, NOISE, EMPTY, SPAM)
SAYS_NOTHING = (NOISE, EMPTY, SPAM)

# Shares of the garment images' captions (junk images say nothing, in the say-nothing kinds'
# proportions): most describe, one in eight names another class, the rest say nothing, mostly
# file names and boilerplate, fewer empty or spam.
DEFAULT_CAPTION_MIX = {DESCRIBES: 0.70, WRONG: 0.12, NOISE: 0.10, EMPTY: 0.04, SPAM: 0.04}

# Each class's nouns, the first its own name. No noun of one class occurs in another's as a
# whole word ("-" counted as part of a word: "t-shirt" does not name a shirt), nor in the
# templates' other words or in the noise and spam vocabularies.
CLASS_NOUNS: dict[str, tuple[str, ...]] = {
    "t-shirt/top": ("t-shirt", "tee", "top", "tank top", "crew neck tee"),
    "trouser": ("trousers", "pants", "jeans", "chinos", "slacks"),
    "pullover": ("pullover", "sweater", "jumper", "knit sweater", "sweatshirt"),
    "dress": ("dress", "summer dress", "maxi dress", "midi dress", "sundress"),
    "coat": ("coat", "jacket", "parka", "trench coat", "winter coat"),
    "sandal": ("sandal", "sandals", "flip flops", "strappy sandals", "heeled sandal"),
    "shirt": ("shirt", "button-down shirt", "blouse", "flannel shirt", "oxford shirt"),
    "sneaker": ("sneaker", "sneakers", "trainer", "trainers", "running shoe"),
    "bag": ("bag", "handbag", "tote", "tote bag", "shoulder bag", "purse"),
    "ankle boot": ("ankle boot", "ankle boots", "boot", "boots", "chelsea boot"),
}

# What the pixels show. An object pixel is brighter than OBJECT_LEVEL; its mean gives the tone.
OBJECT_LEVEL = 30
DARK_BELOW, LIGHT_FROM = 120, 190  # mean object level: about a fifth dark, a third light
TONE_WORDS = {"dark": ("black", "dark"), "grey": ("grey", "gray"), "light": ("white", "light")}
# Texture: the mean |pixel - mean of its 4 neighbours| over the object's interior (object pixels
# whose 4 neighbours are object too). Thin objects (sandal straps) have too little interior to say.
MIN_INTERIOR = 80
PLAIN_BELOW, PATTERNED_FROM = 14.0, 28.0  # about a third plain, one in thirteen patterned
TEXTURE_WORDS = {"plain": ("plain", "solid"), "patterned": ("patterned", "printed")}

_FOOTWEAR = {"sandal", "sneaker", "ankle boot"}
_TEMPLATES = (
    "a photo of {a_desc}",
    "{desc}",
    "{desc} on sale",
    "{who} {desc}, {size}",
    "vintage {desc}",
    "new {desc} for {season}",
    "{Desc} | free returns",
    "close-up of {a_desc}",
    "my new {desc}!",
    "{desc}, product photo",
    "classic {desc} for {whom}",
    "buy {desc} online",
    "{Desc} - {size} - {who}",
    "{a_desc} on a black background",
)
_WHO = ("men's", "women's", "unisex", "kids'")
_WHOM = ("men", "women", "kids", "everyday wear")
_SEASONS = ("summer", "winter", "spring", "autumn", "the weekend")
_BOILERPLATE = (
    "free shipping", "click here", "buy now", "add to cart", "shop now", "limited time offer!!!", "sale",
    "new arrivals", "image not available", "loading...", "view larger image", "in stock",
    "best price guaranteed", "free shipping on orders over $50", "click to enlarge", "sold out", "untitled",
)
_SPAM_WORDS = (
    "cheap", "best", "price", "discount", "wholesale", "fashion", "outlet", "online", "store", "free", "shipping",
    "deal", "sale", "buy", "new", "style", "trend", "luxury", "brand", "authentic", "original", "quality", "offer",
    "coupon", "promo", "code", "clearance", "official", "site", "click", "now", "hot", "apparel", "clothing",
    "outfit", "men", "women", "kids", "casual", "designer", "fast", "delivery", "worldwide", "100%", "guaranteed",
    "lowest", "2024", "collection", "exclusive", "limited", "stock", "order", "today", "shop", "genuine",
)
SPAM_WORDS_MIN, SPAM_WORDS_MAX = 200, 600


@dataclass(frozen=True)
class Caption:
    text: str
    kind: str  # one of CAPTION_KINDS
    label: int | None  # the class the text names (describes: the sample's own; wrong: another), else None


def make_caption(label: int, pixels: np.ndarray, kind: str, rng: np.random.Generator) -> Caption:
    """A caption of `kind` for an image of class `label` (-1: junk, no class) with these pixels."""
    if kind == DESCRIBES:
        if not 0 <= label < len(CLASS_NAMES):
            raise ValueError(f"a describing caption needs a class label in 0..{len(CLASS_NAMES) - 1}, got {label}")
        return Caption(describe(label, pixels, rng), kind, int(label))
    if kind == WRONG:
        others = [c for c in range(len(CLASS_NAMES)) if c != label]
        other = others[int(rng.integers(len(others)))]
        return Caption(describe(other, pixels, rng), kind, other)
    if kind == NOISE:
        return Caption(noise_caption(rng), kind, None)
    if kind == EMPTY:
        return Caption("", kind, None)
    if kind == SPAM:
        return Caption(spam_caption(rng), kind, None)
    raise ValueError(f"caption kind must be one of {CAPTION_KINDS}, got {kind!r}")


def describe(label: int, pixels: np.ndarray, rng: np.random.Generator) -> str:
    """A shop-style description of class `label`, with the tone and texture these pixels show."""
    name = CLASS_NAMES[label]
    words = [_pick(CLASS_NOUNS[name], rng)]
    tone, texture = tone_of(pixels), texture_of(pixels)
    if rng.random() < 0.6:
        words.insert(0, _pick(TONE_WORDS[tone], rng))
    if texture is not None and rng.random() < 0.5:
        word = _pick(TEXTURE_WORDS[texture], rng)
        # "plain white tee", "black patterned dress"
        words.insert(0 if texture == "plain" else len(words) - 1, word)
    desc = " ".join(words)
    template = _pick(_TEMPLATES, rng)
    return template.format(
        desc=desc, Desc=desc[0].upper() + desc[1:], a_desc=f"{'an' if desc[0] in 'aeiou' else 'a'} {desc}",
        who=_pick(_WHO, rng), whom=_pick(_WHOM, rng), season=_pick(_SEASONS, rng), size=_size(name, rng),
    )


def tone_of(pixels: np.ndarray) -> str:
    """"dark", "grey" or "light": the mean level of the object's pixels."""
    values = np.asarray(pixels, dtype=np.float64)
    obj = values[values > OBJECT_LEVEL]
    level = obj.mean() if obj.size else 0.0
    return "dark" if level < DARK_BELOW else "light" if level >= LIGHT_FROM else "grey"


def texture_of(pixels: np.ndarray) -> str | None:
    """"plain", "patterned", or None where the pixels do not say (in between, or too thin an object)."""
    x = np.asarray(pixels, dtype=np.float64)
    on = x > OBJECT_LEVEL
    centre, up, down, left, right = x[1:-1, 1:-1], x[:-2, 1:-1], x[2:, 1:-1], x[1:-1, :-2], x[1:-1, 2:]
    interior = on[1:-1, 1:-1] & on[:-2, 1:-1] & on[2:, 1:-1] & on[1:-1, :-2] & on[1:-1, 2:]
    if interior.sum() < MIN_INTERIOR:
        return None
    detail = float(np.abs(centre - (up + down + left + right) / 4)[interior].mean())
    return "plain" if detail < PLAIN_BELOW else "patterned" if detail >= PATTERNED_FROM else None


def noise_caption(rng: np.random.Generator) -> str:
    """A caption that says nothing about the image: a camera or CMS file name, or shop boilerplate."""
    if rng.random() < 0.5:
        return _pick(_BOILERPLATE, rng)
    n = int(rng.integers(0, 100_000))
    y, m, d = int(rng.integers(2009, 2025)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    names = (
        f"IMG_{n % 10_000:04d}.jpg", f"DSC{n:05d}", f"DSC_{n % 10_000:04d}.JPG", f"image ({n % 20 + 1}).png",
        f"photo_{y}-{m:02d}-{d:02d}.jpeg", f"P{n:07d}.JPG", f"product-image-{n % 12 + 1}",
        f"thumbnail_{n % 500}.jpg", f"{n * 2654435761 % 2**32:08x}.webp", f"Screenshot {y}-{m:02d}-{d:02d} at {n % 12 + 1}.{n % 60:02d}.{n % 59:02d}",
    )
    return _pick(names, rng)


def spam_caption(rng: np.random.Generator) -> str:
    """Keyword stuffing: SPAM_WORDS_MIN to SPAM_WORDS_MAX words of shop vocabulary, no class noun."""
    n = int(rng.integers(SPAM_WORDS_MIN, SPAM_WORDS_MAX + 1))
    words = [_SPAM_WORDS[i] for i in rng.integers(0, len(_SPAM_WORDS), size=n)]
    return " ".join(w + ("!!!" if bang else "") for w, bang in zip(words, rng.random(n) < 0.05))


def caption_mix(shares: Mapping[str, float] | None = None) -> dict[str, float]:
    """Every kind's share, in CAPTION_KINDS order, from the shares given (None: the default mix).

    Kinds not given have share 0 and `describes` is the rest; given, it must be that rest.
    Each share is in [0, 1] and the others sum to at most 1. Raises ValueError naming the problem.
    """
    if shares is None:
        return dict(DEFAULT_CAPTION_MIX)
    unknown = [k for k in shares if k not in CAPTION_KINDS]
    if unknown:
        raise ValueError(f"unknown caption kind {unknown[0]!r}: the kinds are {', '.join(CAPTION_KINDS)}")
    for kind, share in shares.items():
        if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0 <= share <= 1:  # NaN too
            raise ValueError(f"the {kind} share must be a number in [0, 1], got {share!r}")
    rest = math.fsum(float(v) for k, v in shares.items() if k != DESCRIBES)
    if rest > 1 + 1e-9:
        named = " + ".join(k for k in CAPTION_KINDS[1:] if k in shares)
        raise ValueError(f"the shares {named} sum to {rest:g}, more than 1")
    describes = round(max(0.0, 1.0 - rest), 12)
    if DESCRIBES in shares and abs(shares[DESCRIBES] - describes) > 1e-9:
        raise ValueError(f"the describes share is the rest, {describes:g}; got {shares[DESCRIBES]:g} "
                         "(leave it out, or make all the shares sum to 1)")
    return {DESCRIBES: describes} | {k: float(shares.get(k, 0.0)) for k in CAPTION_KINDS[1:]}


def parse_caption_mix(text: str) -> dict[str, float]:
    """"wrong=0.12,noise=0.1,empty=0.04,spam=0.04" -> the full mix (caption_mix); "" -> all describe."""
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, eq, value = part.partition("=")
        kind = kind.strip()
        if not eq or not kind:
            raise ValueError(f"expected KIND=SHARE pairs separated by commas, e.g. wrong=0.12,noise=0.1; got {part!r}")
        if kind in shares:
            raise ValueError(f"{kind} given twice")
        try:
            shares[kind] = float(value)
        except ValueError:
            raise ValueError(f"the {kind} share must be a number in [0, 1], got {value.strip()!r}") from None
    return caption_mix(shares)


def format_mix(mix: Mapping[str, float]) -> str:
    """The flag's form of a mix: "wrong=0.12,noise=0.1,empty=0.04,spam=0.04" (describes is the rest)."""
    return ",".join(f"{k}={mix[k]:g}" for k in CAPTION_KINDS[1:] if mix.get(k))


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def _size(name: str, rng: np.random.Generator) -> str:
    if name in _FOOTWEAR:
        return f"size {int(rng.integers(36, 47))}"
    if name == "trouser":
        return f"W{int(rng.integers(14, 20)) * 2} L{_pick((30, 32, 34), rng)}"
    if name == "bag":
        return "one size"
    return f"size {_pick(('XS', 'S', 'M', 'L', 'XL'), rng)}"
