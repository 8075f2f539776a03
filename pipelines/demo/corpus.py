"""The embedded default: a generated, labelled review corpus and a model trained on it.

Nothing is downloaded. The corpus is generated from templates with a fixed seed; the default model
is the packaged all-MiniLM-L6-v2 with four heads (binary, multiclass, multilabel, grouped),
fine-tuned on the corpus's train split by the project's own training job. Both are built once into
a cache directory (``$MTCLS_CACHE``, default ``~/.cache/mtcls``) and reused; nothing large is
committed to the repository.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mtcls.default import cache_dir

log = logging.getLogger(__name__)

SAMPLE_VERSION = "v2"
ASPECTS = ["price", "quality", "delivery", "service"]
DEFAULT_HEADS = [
    {"name": "spam", "kind": "binary", "labels": ["ham", "spam"]},
    {"name": "sentiment", "kind": "multiclass", "labels": ["negative", "neutral", "positive"]},
    {"name": "aspects", "kind": "multilabel", "labels": ASPECTS},
    {"name": "aspect_sentiment", "kind": "grouped", "groups": ASPECTS, "labels": ["absent", "negative", "positive"]},
]

_PRODUCTS = ["blender", "laptop", "jacket", "phone case", "coffee maker", "desk lamp", "backpack", "headphones",
             "kettle", "office chair", "sneakers", "monitor", "toaster", "camera", "vacuum"]
_PHRASES = {
    ("price", "positive"): ["the price was a bargain", "great value for the money", "cheaper than anywhere else",
                            "worth every cent", "very affordable"],
    ("price", "negative"): ["way too expensive", "overpriced for what you get", "not worth the money",
                            "the price is a rip-off", "costs far too much"],
    ("quality", "positive"): ["the build quality is excellent", "feels solid and well made", "works perfectly",
                              "sturdy and reliable", "the materials are superb"],
    ("quality", "negative"): ["it broke after two days", "feels cheap and flimsy", "stopped working within a week",
                              "poorly made", "the material started falling apart"],
    ("delivery", "positive"): ["shipping was fast", "it arrived a day early", "delivery was quick and easy",
                               "the package came right on time", "arrived well packed"],
    ("delivery", "negative"): ["shipping took forever", "it arrived three weeks late", "the box was crushed in transit",
                               "delivery was a nightmare", "the parcel got lost twice"],
    ("service", "positive"): ["customer support was very helpful", "the seller answered within minutes",
                              "the staff were friendly", "support sorted out my question quickly",
                              "great after-sales service"],
    ("service", "negative"): ["customer service never replied", "the seller was rude", "support kept ignoring my emails",
                              "the refund process was awful", "nobody at the help desk could help"],
}
_NEUTRAL = ["I bought the {p} last month.", "This is my second {p}.", "Got the {p} as a gift.",
            "It is a {p}, nothing more to say.", "Using the {p} at home."]
_SPAM = ["CLICK HERE to win a free {p}!!!", "Earn $500 a day from home, visit my profile",
         "Best deals on {p} at cheap-stuff dot biz, use code WIN50", "Follow me for free gift cards and giveaways",
         "Limited offer!!! Buy 1 {p} get 5 free, DM now"]


def generate_reviews(n: int, seed: int = 0) -> pa.Table:
    """Generates labelled product reviews.

    Args:
        n: Number of rows.
        seed: Random seed; the same seed gives the same table.

    Returns:
        Columns ``id``, ``text``, ``spam`` (ham/spam), ``sentiment`` (negative/neutral/positive),
        ``aspects`` (list of aspect names), ``aspect_sentiment`` (struct: aspect -> absent/negative/positive).
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        product = rng.choice(_PRODUCTS)
        row = {"id": f"r{seed}-{i:06d}", "spam": "ham", "aspects": [], "aspect_sentiment": {a: "absent" for a in ASPECTS}}
        roll = rng.random()
        if roll < 0.08:
            row.update(text=rng.choice(_SPAM).format(p=product), spam="spam", sentiment="neutral")
        elif roll < 0.18:
            row.update(text=rng.choice(_NEUTRAL).format(p=product), sentiment="neutral")
        else:
            aspects = rng.sample(ASPECTS, rng.choice([1, 1, 2, 2, 3]))
            polarity = {a: rng.choice(["positive", "negative"]) for a in aspects}
            parts = [rng.choice(_PHRASES[(a, polarity[a])]) for a in aspects]
            opener = rng.choice(["The {p}: ", "About the {p}, ", "My new {p}: ", "", ""]).format(p=product)
            text = opener + rng.choice([", ", " and ", ". Also, ", " but "]).join(parts) + "."
            values = set(polarity.values())
            row.update(
                text=text[0].upper() + text[1:],
                sentiment=values.pop() if len(values) == 1 else "neutral",
                aspects=sorted(aspects, key=ASPECTS.index),
                aspect_sentiment={a: polarity.get(a, "absent") for a in ASPECTS},
            )
        rows.append(row)
    struct = pa.struct([(a, pa.string()) for a in ASPECTS])
    return pa.table(
        {
            "id": [r["id"] for r in rows],
            "text": [r["text"] for r in rows],
            "spam": [r["spam"] for r in rows],
            "sentiment": [r["sentiment"] for r in rows],
            "aspects": pa.array([r["aspects"] for r in rows], pa.list_(pa.string())),
            "aspect_sentiment": pa.array([r["aspect_sentiment"] for r in rows], struct),
        }
    )


def default_corpus_dir(rows: int = 2000) -> Path:
    """The demo corpus as Parquet (``train.parquet``, ``test.parquet``), generated on first use."""
    target = cache_dir() / f"sample-corpus-{SAMPLE_VERSION}-{rows}"
    if not (target / "test.parquet").is_file():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pq.write_table(generate_reviews(rows, seed=1), tmp / "train.parquet")
        pq.write_table(generate_reviews(rows, seed=2), tmp / "test.parquet")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target
