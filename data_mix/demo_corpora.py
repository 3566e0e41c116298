"""The built-in demo corpora: synthetic stand-ins for real financial and public text.

They are made by this code, deterministically from a seed, so the demo and the tests
need no download. Each corpus has its own vocabulary and phrasing, enough for a tiny
model to learn and for per-domain bits-per-byte to tell the domains apart; they
are not real filings, news, encyclopedia articles or web pages. Four formats are
used on purpose, as users bring them: filings as JSONL, news as CSV (headline and
body fields), encyclopedia articles as Parquet, web pages as one text file each.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COMPANIES = ["Northwind Capital", "Acme Holdings", "Globex Corporation", "Initech Financial", "Umbrella Bancorp",
             "Stark Industries", "Wayne Enterprises", "Hooli Inc.", "Vandelay Trading", "Soylent Foods"]
TICKERS = ["NWC", "ACME", "GBX", "INTF", "UMB", "STRK", "WAYN", "HOOL", "VDL", "SOYL"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SEGMENTS = ["commercial banking", "asset management", "consumer lending", "wealth management", "payments",
            "insurance", "capital markets", "treasury services"]
FILING_SENTENCES = [
    "Total revenue was ${a} million for the {period} ended {month} {day}, {year}, {dir} {pct}% compared with ${b} million in the prior-year period.",
    "Net interest income {verb} to ${a} million, driven primarily by higher average loan balances in {segment}.",
    "Diluted earnings per share were ${eps}, compared with ${eps2} for the same period of {prev}.",
    "Operating expenses {verb} {pct}% to ${a} million, reflecting investments in technology and personnel in {segment}.",
    "The Company's Common Equity Tier 1 capital ratio was {ratio}% as of {month} {day}, {year}.",
    "The provision for credit losses was ${c} million, reflecting changes in the macroeconomic outlook.",
    "We may be adversely affected by changes in interest rates, which could reduce our net interest margin.",
    "Liquidity risk is managed through a diversified funding base of deposits, long-term debt and equity.",
    "The Board of Directors declared a quarterly cash dividend of ${div} per share, payable on {month} {day}, {year}.",
    "Cash and cash equivalents totaled ${a} million at the end of the {period}.",
    "Revenue from {segment} represented {pct}% of total revenue in fiscal {year}.",
    "Forward-looking statements are subject to risks and uncertainties that could cause actual results to differ materially.",
]
FILING_ITEMS = ["Item 1A. Risk Factors", "Item 7. Management's Discussion and Analysis of Financial Condition",
                "Item 7A. Quantitative and Qualitative Disclosures About Market Risk", "Item 8. Financial Statements"]
NEWS_HEADLINES = [
    "{company} shares {move} {pct}% after {event}",
    "{company} ({ticker}) beats estimates as {segment} revenue climbs",
    "{company} to cut {n} jobs amid slowdown in {segment}",
    "Analysts {stance} {company} ahead of {month} earnings",
]
NEWS_EVENTS = ["quarterly results topped forecasts", "the central bank held rates steady", "a surprise guidance cut",
               "regulators approved the merger", "the chief executive stepped down", "a credit rating downgrade"]
NEWS_SENTENCES = [
    "Shares of {company} ({ticker}) {move} {pct}% to ${price} in {session} trading on {weekday}.",
    "The stock has {move} {pct2}% so far this year, compared with a {pct3}% gain in the S&P 500.",
    "Analysts at {bank} {stance} the stock with a price target of ${target}.",
    "\"We remain focused on disciplined growth in {segment},\" the chief financial officer said on a call with analysts.",
    "The company reported adjusted earnings of ${eps} a share, above the consensus estimate of ${eps2}.",
    "Treasury yields {move} as investors weighed the latest inflation data and the Federal Reserve's next move.",
    "Trading volume was about {n} million shares, roughly {ratio} times the 30-day average.",
    "{company} said it expects full-year revenue between ${a} billion and ${b} billion.",
]
TOPICS = ["river", "mountain range", "cathedral", "moth", "volcano", "lighthouse", "glacier", "orchid", "castle",
          "comet", "fern", "harbour", "monastery", "lake", "beetle", "observatory"]
PLACES = ["northern Italy", "the Andes", "central Asia", "the Baltic coast", "southern Chile", "the Scottish Highlands",
          "eastern Anatolia", "the Iberian Peninsula", "New Zealand", "the Carpathians"]
NAMES = ["Ortelius", "Marisol", "Halvard", "Ingrid", "Teodor", "Amara", "Leopold", "Sigrun", "Casimir", "Elowen"]
ENCYCLOPEDIA_SENTENCES = [
    "The {name} {topic} is a {topic} located in {place}.",
    "It was first described in {year} by the naturalist {person}, who noted its unusual {feature}.",
    "The {topic} has an area of about {n} square kilometres and lies at an elevation of {m} metres.",
    "During the {century} century the region around the {topic} was settled by farmers and herders.",
    "Its name derives from an old word meaning \"{meaning}\".",
    "The climate is {climate}, with cold winters and mild summers.",
    "Several species of {creature} are found only in the vicinity of the {topic}.",
    "Since {year} the site has been protected as part of a national park.",
]
WEB_OPENERS = ["Honestly, ", "Okay so ", "Quick update: ", "Hey everyone, ", "Not gonna lie, ", ""]
WEB_SENTENCES = [
    "I tried the {food} recipe from last week and it turned out {quality}.",
    "Does anyone know a good place to buy a {item} near {city}?",
    "We drove to {city} on the weekend and the traffic was {quality}.",
    "My {pet} keeps chewing the {item}, any tips?",
    "The new {item} arrived today and the battery life is {quality} so far.",
    "Click here to subscribe to our newsletter for more {food} ideas!",
    "Thanks for reading, leave a comment below if you liked this post about {food}.",
    "5 stars, would buy this {item} again, shipping to {city} took {n} days.",
]
FOODS = ["lasagna", "banana bread", "ramen", "chili", "pancake", "curry", "sourdough", "taco"]
ITEMS = ["blender", "bike helmet", "laptop stand", "phone case", "garden hose", "desk lamp", "backpack", "kettle"]
CITIES = ["Springfield", "Riverton", "Lakeside", "Oakdale", "Fairview", "Maplewood"]


def _fill(rng: random.Random, template: str, **fixed: str) -> str:
    company = rng.randrange(len(COMPANIES))
    values = {
        "company": COMPANIES[company], "ticker": TICKERS[company],
        "a": f"{rng.uniform(50, 9000):,.1f}", "b": f"{rng.uniform(50, 9000):,.1f}", "c": f"{rng.uniform(1, 400):.1f}",
        "pct": f"{rng.uniform(0.5, 35):.1f}", "pct2": f"{rng.uniform(0.5, 60):.1f}", "pct3": f"{rng.uniform(0.5, 25):.1f}",
        "eps": f"{rng.uniform(0.1, 9):.2f}", "eps2": f"{rng.uniform(0.1, 9):.2f}", "div": f"{rng.uniform(0.05, 2):.2f}",
        "ratio": f"{rng.uniform(1, 15):.1f}", "price": f"{rng.uniform(5, 900):.2f}", "target": str(rng.randrange(10, 1000)),
        "period": rng.choice(["quarter", "three months", "fiscal year", "six months"]),
        "month": rng.choice(MONTHS), "day": str(rng.randrange(1, 29)), "year": str(rng.randrange(1850, 2025)),
        "prev": str(rng.randrange(2015, 2024)), "dir": rng.choice(["an increase of", "a decrease of"]),
        "verb": rng.choice(["increased", "decreased", "rose", "declined"]), "segment": rng.choice(SEGMENTS),
        "move": rng.choice(["rose", "fell", "jumped", "slipped", "climbed"]), "event": rng.choice(NEWS_EVENTS),
        "stance": rng.choice(["upgraded", "downgraded", "reiterated a buy rating on", "initiated coverage of"]),
        "bank": rng.choice(["Morgan Stanley", "Goldman Sachs", "JPMorgan", "Barclays", "UBS"]),
        "session": rng.choice(["early", "afternoon", "late", "premarket"]),
        "weekday": rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]),
        "n": str(rng.randrange(2, 900)), "m": str(rng.randrange(10, 4800)), "topic": rng.choice(TOPICS),
        "place": rng.choice(PLACES), "name": rng.choice(NAMES), "person": rng.choice(NAMES) + " " + rng.choice(NAMES) + "son",
        "feature": rng.choice(["colouring", "shape", "acoustics", "seasonal flooding", "symmetry"]),
        "century": rng.choice(["twelfth", "fourteenth", "sixteenth", "eighteenth", "nineteenth"]),
        "meaning": rng.choice(["white water", "high pasture", "grey stone", "the crossing", "old fort"]),
        "climate": rng.choice(["continental", "alpine", "oceanic", "semi-arid"]),
        "creature": rng.choice(["moth", "beetle", "lichen", "trout", "fern"]), "food": rng.choice(FOODS),
        "item": rng.choice(ITEMS), "city": rng.choice(CITIES), "pet": rng.choice(["dog", "cat", "parrot", "rabbit"]),
        "quality": rng.choice(["amazing", "terrible", "pretty good", "not great", "way better than expected"]),
    }
    return template.format(**(values | fixed))


def _paragraphs(rng: random.Random, sentences: list[str], count: int, per: tuple[int, int], **fixed: str) -> str:
    return "\n\n".join(
        " ".join(_fill(rng, rng.choice(sentences), **fixed) for _ in range(rng.randint(*per))) for _ in range(count)
    )


def filing(rng: random.Random) -> str:
    company = rng.randrange(len(COMPANIES))
    head = f"{COMPANIES[company]} (NYSE: {TICKERS[company]})\nAnnual Report on Form 10-K\n"
    sections = [f"{item}\n\n" + _paragraphs(rng, FILING_SENTENCES, rng.randint(1, 3), (3, 6)) for item in rng.sample(FILING_ITEMS, 2)]
    return head + "\n\n".join(sections)


def news(rng: random.Random) -> tuple[str, str]:
    return _fill(rng, rng.choice(NEWS_HEADLINES)), _paragraphs(rng, NEWS_SENTENCES, rng.randint(2, 4), (2, 4))


def article(rng: random.Random) -> tuple[str, str]:
    title = f"{rng.choice(NAMES)} {rng.choice(TOPICS)}".title()
    return title, _paragraphs(rng, ENCYCLOPEDIA_SENTENCES, rng.randint(2, 4), (3, 5))


def web_page(rng: random.Random) -> str:
    return rng.choice(WEB_OPENERS) + _paragraphs(rng, WEB_SENTENCES, rng.randint(3, 9), (2, 5))


def write_demo_corpora(data_dir: Path, seed: int = 0, scale: float = 1.0) -> dict[str, int]:
    """Write the four demo corpora under `data_dir`; returns bytes written per corpus."""
    rng = random.Random(seed)
    counts = {name: max(4, int(n * scale)) for name, n in {"filings": 900, "news": 1400, "encyclopedia": 1300, "web": 600}.items()}
    written: dict[str, int] = {}

    (data_dir / "filings").mkdir(parents=True, exist_ok=True)
    for part in range(2):
        path = data_dir / "filings" / f"filings-{part}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for number in range(counts["filings"] // 2):
                out.write(json.dumps({"id": f"{part}-{number}", "text": filing(rng)}) + "\n")
        written["filings"] = written.get("filings", 0) + path.stat().st_size

    path = data_dir / "news.csv"
    with open(path, "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["headline", "body"])
        writer.writerows(news(rng) for _ in range(counts["news"]))
    written["news"] = path.stat().st_size

    rows = [article(rng) for _ in range(counts["encyclopedia"])]
    path = data_dir / "encyclopedia.parquet"
    pq.write_table(pa.table({"title": [r[0] for r in rows], "text": [r[1] for r in rows]}), path)
    written["encyclopedia"] = path.stat().st_size

    (data_dir / "web").mkdir(parents=True, exist_ok=True)
    written["web"] = 0
    for number in range(counts["web"]):
        path = data_dir / "web" / f"page-{number:05d}.txt"
        path.write_text(web_page(rng), encoding="utf-8")
        written["web"] += path.stat().st_size
    return written
