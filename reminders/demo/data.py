"""The demo business: Harbor Market, a store with a pharmacy counter, a store card and a web shop.

:func:`generate` writes its database (SQLite) with a few hundred customers across several time
zones, and dates relative to ``now`` so that every shipped rule has something to say today:

- ``customers``: some without a phone or an email, one with an invalid number, one with neither,
  some with no time zone (the config's default applies), numbers in the shapes people type them;
- ``subscriptions`` (subscriptions and extended warranties): some ending in 30, 7 or 1 days, some
  already renewed, some canceled;
- ``prescriptions``: some running out in 3 days, some refilled early;
- ``bills`` (Harbor Card statements): due in 5 days, due today, 3 days overdue; some already paid;
- ``orders`` and ``products`` (digital, physical, consumable): delivered orders for the follow-up,
  and fresh orders of something the customer already owns (digital long ago, physical within the
  window, and near misses that are not duplicates: a physical item bought long ago, coffee beans);
- ``support_tickets``: customers who already called about an order get no follow-up;
- ``settings`` and the view ``owned_items``: the business's own definition of a duplicate purchase,
  read by both the ``duplicate-purchase`` rule and the ``already-owned`` checkout check.

Numbers are fictional: +1 area code 555-0100 to 0199 (reserved for fiction, yet valid to
``phonenumbers``) and +44 20 7946 0xxx (Ofcom's drama range); addresses are ``@example.com``.
The same seed gives the same business; only the dates follow ``now``.
"""

from __future__ import annotations

import random
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

# The rules' local time of day for day offsets (rules/*.yaml: at: "10:00"). Items meant to be due
# now are dated so that their reminder's time is the most recent 10:00 in the customer's zone.
AT = time(10, 0)
DEFAULT_ZONE = "America/New_York"  # config.yaml: timezone
DUPLICATE_WINDOW_DAYS = 60  # settings.duplicate_window_days: physical goods bought again within it

SCHEMA = """
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    first_name TEXT NOT NULL,
    last_name TEXT NOT NULL,
    phone TEXT,
    email TEXT,
    timezone TEXT,
    locale TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE products (
    sku TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('digital', 'physical', 'consumable')),
    price TEXT NOT NULL
);
CREATE TABLE subscriptions (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id),
    kind TEXT NOT NULL CHECK (kind IN ('subscription', 'warranty')),
    product TEXT NOT NULL,
    price TEXT NOT NULL,
    currency TEXT NOT NULL DEFAULT 'USD',
    started_on TEXT NOT NULL,
    expires_on TEXT NOT NULL,
    renewed_on TEXT,
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'canceled'))
);
CREATE TABLE prescriptions (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id),
    drug_name TEXT NOT NULL,
    days_supply INTEGER NOT NULL,
    last_filled_on TEXT NOT NULL,
    refills_left INTEGER NOT NULL
);
CREATE TABLE bills (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id),
    account TEXT NOT NULL,
    amount TEXT NOT NULL,
    currency TEXT NOT NULL DEFAULT 'USD',
    due_on TEXT NOT NULL,
    paid_on TEXT
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id),
    sku TEXT NOT NULL REFERENCES products (sku),
    title TEXT NOT NULL,
    amount TEXT NOT NULL,
    currency TEXT NOT NULL DEFAULT 'USD',
    placed_at TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'paid' CHECK (status IN ('paid', 'refunded')),
    delivered_on TEXT
);
CREATE TABLE support_tickets (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id),
    order_id INTEGER REFERENCES orders (id),
    subject TEXT NOT NULL,
    opened_at TEXT NOT NULL
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- The business's definition of a duplicate purchase, in one place: every paid order of a digital
-- or physical product (consumables are bought again on purpose), and until when buying the same
-- product again is a duplicate (digital: forever, NULL; physical: the settings' window).
CREATE VIEW owned_items AS
SELECT o.id AS order_id, o.customer_id, o.sku, o.title, o.amount, o.currency, o.placed_at,
       p.kind,
       CASE p.kind
           WHEN 'digital' THEN NULL
           ELSE strftime('%Y-%m-%dT%H:%M:%SZ', o.placed_at, '+' || (
               SELECT value FROM settings WHERE key = 'duplicate_window_days') || ' days')
       END AS duplicate_until
FROM orders o JOIN products p ON p.sku = o.sku
WHERE o.status = 'paid' AND p.kind IN ('digital', 'physical');
"""

FIRST_NAMES = [
    "Olivia",
    "Liam",
    "Emma",
    "Noah",
    "Ava",
    "Elijah",
    "Sophia",
    "James",
    "Isabella",
    "Lucas",
    "Mia",
    "Mateo",
    "Amelia",
    "Benjamin",
    "Harper",
    "Henry",
    "Evelyn",
    "Theodore",
    "Abigail",
    "Jack",
    "Emily",
    "Levi",
    "Ella",
    "Alexander",
    "Chloe",
    "Jackson",
    "Aria",
    "Sebastian",
    "Grace",
    "Daniel",
    "Priya",
    "Arjun",
    "Mei",
    "Wei",
    "Aisha",
    "Omar",
    "Fatima",
    "Yusuf",
    "Sofia",
    "Diego",
    "Camila",
    "Santiago",
    "Valentina",
    "Hiroshi",
    "Yuki",
    "Kenji",
    "Chiara",
    "Luca",
    "Ingrid",
    "Lars",
    "Niamh",
    "Siobhan",
    "Kwame",
    "Ama",
    "Chidi",
    "Ngozi",
    "Tomasz",
    "Zofia",
    "Mateus",
    "Beatriz",
    "Rosa",
    "Hannah",
    "Samuel",
    "Leah",
    "David",
    "Ruth",
    "Malik",
    "Imani",
]
LAST_NAMES = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Torres",
    "Nguyen",
    "Hill",
    "Flores",
    "Green",
    "Adams",
    "Nelson",
    "Baker",
    "Hall",
    "Rivera",
    "Campbell",
    "Mitchell",
    "Carter",
    "Roberts",
    "Patel",
    "Shah",
    "Kim",
    "Chen",
    "Wang",
    "Okafor",
    "Mensah",
    "Kowalski",
    "Rossi",
    "Nakamura",
    "Tanaka",
    "O'Brien",
    "Murphy",
    "Kelly",
    "Silva",
    "Costa",
    "Andersen",
    "Larsen",
    "Haddad",
    "Khan",
    "Cohen",
    "Levy",
    "Washington",
]

# (zone, locale, share of customers, area codes): the store ships across North America and to
# London. 555-01xx in each area code is fictional.
ZONES: tuple[tuple[str, str, int, tuple[str, ...]], ...] = (
    ("America/New_York", "en_US", 30, ("212", "617", "305")),
    ("America/Chicago", "en_US", 15, ("312", "512")),
    ("America/Denver", "en_US", 8, ("303",)),
    ("America/Phoenix", "en_US", 5, ("602",)),
    ("America/Los_Angeles", "en_US", 20, ("415", "206", "702")),
    ("America/Anchorage", "en_US", 3, ("907",)),
    ("Pacific/Honolulu", "en_US", 3, ("808",)),
    ("America/Toronto", "en_CA", 6, ("416",)),
    ("Europe/London", "en_GB", 10, ("+44",)),
)

# (sku, title, kind, price)
PRODUCTS: tuple[tuple[str, str, str, str], ...] = (
    ("EB-1001", "The Quiet Garden (e-book)", "digital", "12.99"),
    ("EB-1002", "Cooking for Two (e-book)", "digital", "9.99"),
    ("SW-2001", "PhotoStudio Pro license", "digital", "79.00"),
    ("SW-2002", "Trail Maps USA download", "digital", "24.99"),
    ("VC-3001", "Sourdough Masterclass video course", "digital", "39.00"),
    ("HW-4001", "Espresso machine", "physical", "349.00"),
    ("HW-4002", "Noise-cancelling headphones", "physical", "199.00"),
    ("HW-4003", "Air fryer, 5 qt", "physical", "89.99"),
    ("HW-4004", "Cast-iron skillet, 12 in", "physical", "44.50"),
    ("HW-4005", "Desk lamp", "physical", "39.99"),
    ("HW-4006", "Bluetooth speaker", "physical", "59.00"),
    ("HW-4007", "Running shoes", "physical", "120.00"),
    ("HW-4008", "Yoga mat", "physical", "29.99"),
    ("HW-4009", "Electric kettle", "physical", "49.99"),
    ("CN-5001", "Coffee beans, 2 lb", "consumable", "22.00"),
    ("CN-5002", "Printer ink, black", "consumable", "31.99"),
    ("CN-5003", "Vitamin D3, 90 capsules", "consumable", "11.49"),
)

PLANS: tuple[tuple[str, str, str], ...] = (
    ("subscription", "Harbor+ membership", "49.00"),
    ("subscription", "Coffee Club subscription", "120.00"),
    ("subscription", "Photo cloud storage plan", "99.99"),
    ("warranty", "espresso machine", "59.00"),
    ("warranty", "noise-cancelling headphones", "29.00"),
    ("warranty", "laptop", "129.00"),
)

DRUGS = (
    "Atorvastatin 20 mg",
    "Lisinopril 10 mg",
    "Metformin 500 mg",
    "Levothyroxine 50 mcg",
    "Amlodipine 5 mg",
    "Sertraline 50 mg",
    "Omeprazole 20 mg",
    "Losartan 50 mg",
)

CURRENCIES = {"Europe/London": "GBP", "America/Toronto": "CAD"}  # everyone else pays in USD
INVALID_PHONE = "212-555-019"  # a digit short: phonenumbers rejects it, the SMS channel cannot


@dataclass
class Story:
    """What the demo shows beyond the everyday: ids of the rows that make each case visible.

    ``renews``, ``refills``, ``pays``, ``calls_support``: rows due now whose customer acts between
    the scan and the send (see :func:`meanwhile`), so the rule's ``check`` cancels the reminder.
    ``invalid_phone`` and ``no_contact`` are customers; ``checkout_owned`` and ``checkout_new`` are
    (customer id, sku) pairs for the checkout's duplicate check, one owned and one not.
    """

    renews: int = 0
    refills: int = 0
    pays: int = 0
    calls_support: int = 0
    invalid_phone: int = 0
    no_contact: int = 0
    checkout_owned: tuple[int, str] = (0, "")
    checkout_new: tuple[int, str] = (0, "")
    duplicates: list[int] = field(default_factory=list)  # fresh orders that are duplicates
    not_duplicates: list[int] = field(default_factory=list)  # fresh orders that are not


@dataclass
class Generated:
    """The generated database: where it is, how many rows each table got, and the story's ids."""

    path: Path
    now: datetime
    counts: dict[str, int]
    story: Story


# --- writing rows -----------------------------------------------------------------------------


def create(path: str | Path) -> sqlite3.Connection:
    """Create an empty business database at ``path`` (replacing any file there); return it open."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(target)
    conn.executescript(SCHEMA)
    conn.execute(
        "INSERT INTO settings (key, value) VALUES ('duplicate_window_days', ?)",
        (str(DUPLICATE_WINDOW_DAYS),),
    )
    conn.executemany("INSERT INTO products (sku, title, kind, price) VALUES (?, ?, ?, ?)", PRODUCTS)
    return conn


def insert(conn: sqlite3.Connection, table: str, **values: Any) -> int:
    """Insert one row (dates and datetimes written as the schema stores them); return its id."""
    columns = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    cursor = conn.execute(
        f"INSERT INTO {table} ({columns}) VALUES ({marks})",
        [_stored(v) for v in values.values()],
    )
    return int(cursor.lastrowid or 0)


def _stored(value: Any) -> Any:
    if isinstance(value, datetime):
        return stamp(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def stamp(moment: datetime) -> str:
    """An instant as the database stores it: UTC, ``2027-03-14T14:05:00Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def anchor_day(now: datetime, zone: str | None, at: time = AT) -> date:
    """The local day whose ``at`` is the latest one at or before ``now`` in ``zone``.

    A reminder planned for that day at ``at`` is due now and still within a day's grace, whatever
    the hour the demo runs at.
    """
    local = now.astimezone(ZoneInfo(zone or DEFAULT_ZONE))
    return local.date() if local.time() >= at else local.date() - timedelta(days=1)


def local_today(now: datetime, zone: str | None) -> date:
    return now.astimezone(ZoneInfo(zone or DEFAULT_ZONE)).date()


# --- the business -----------------------------------------------------------------------------


class _Phones:
    """Hands out fictional numbers, each once, written the many ways people type them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def number(self, area: str) -> str:
        for _ in range(1000):
            line = self.rng.randrange(100, 200)
            key = f"{area}:{line}"
            if key in self.used:
                continue
            self.used.add(key)
            if area == "+44":
                return f"+44 20 7946 0{line:03d}"
            shape = self.rng.randrange(4)
            if shape == 0:
                return f"({area}) 555-0{line:03d}"
            if shape == 1:
                return f"{area}.555.0{line:03d}"
            if shape == 2:
                return f"+1 {area} 555 0{line:03d}"
            return f"{area}5550{line:03d}"
        raise RuntimeError(f"no fictional numbers left in area {area}")


def _customers(
    conn: sqlite3.Connection, rng: random.Random, count: int, now: datetime
) -> list[dict[str, Any]]:
    phones = _Phones(rng)
    emails: set[str] = set()
    weights = [z[2] for z in ZONES]
    people: list[dict[str, Any]] = []
    for number in range(1, count + 1):
        zone, locale, _, areas = rng.choices(ZONES, weights)[0]
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        local = f"{first}.{last}".lower().replace("'", "")
        email = f"{local}@example.com"
        suffix = 2
        while email in emails:
            email, suffix = f"{local}{suffix}@example.com", suffix + 1
        emails.add(email)
        person: dict[str, Any] = {
            "first_name": first,
            "last_name": last,
            "phone": phones.number(rng.choice(areas)),
            "email": email,
            "timezone": zone,
            "locale": locale,
            "created_at": now - timedelta(days=rng.randrange(30, 1500)),
        }
        if locale == "en_US" and number % 8 == 5:
            # About one US customer in eight reads Spanish (the templates' *.es.* variants); no
            # random draw, so everyone else's data stays as it was.
            person["locale"] = "es_US"
        roll = rng.random()
        if number == 3:
            person["phone"] = INVALID_PHONE  # one typo in the shop's records
            person["timezone"], person["locale"] = "America/New_York", "en_US"
        elif number == 4:
            person["phone"] = person["email"] = None  # signed up in store, left no contact
        elif roll < 0.08:
            person["phone"] = None
        elif roll < 0.15:
            person["email"] = None
        elif roll < 0.20 and zone == DEFAULT_ZONE:
            person["timezone"] = None  # an old record: the config's default zone applies
        person["id"] = insert(conn, "customers", **person)
        people.append(person)
    return people


def _currency(person: dict[str, Any]) -> str:
    return CURRENCIES.get(person["timezone"] or DEFAULT_ZONE, "USD")


def _reachable(person: dict[str, Any], now: datetime) -> bool:
    """Both contacts present and usable, and awake (outside 21:00-08:00) at ``now``."""
    if not person["phone"] or not person["email"] or person["phone"] == INVALID_PHONE:
        return False
    local = now.astimezone(ZoneInfo(person["timezone"] or DEFAULT_ZONE)).time()
    return time(8) <= local < time(21)


def _pick(rng: random.Random, people: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    return rng.sample(people, min(k, len(people)))


def generate(
    path: str | Path, now: datetime, *, customers: int = 300, seed: int = 2027
) -> Generated:
    """Write the demo business's database at ``path`` (replaced), dated relative to ``now``."""
    rng = random.Random(seed)
    conn = create(path)
    story = Story()
    try:
        people = _customers(conn, rng, customers, now)
        regular = [p for p in people[4:] if p["phone"] and p["email"]]
        awake = [p for p in regular if _reachable(p, now)] or regular
        story.invalid_phone, story.no_contact = people[2]["id"], people[3]["id"]
        _subscriptions(conn, rng, people, regular, awake, now, story)
        _prescriptions(conn, rng, people, regular, awake, now, story)
        _bills(conn, rng, people, regular, awake, now, story)
        _orders(conn, rng, people, regular, awake, now, story)
        conn.commit()
        counts = {
            table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            for table in (
                "customers",
                "subscriptions",
                "prescriptions",
                "bills",
                "orders",
                "support_tickets",
            )
        }
    finally:
        conn.close()
    return Generated(Path(path), now, counts, story)


def _subscriptions(
    conn: sqlite3.Connection,
    rng: random.Random,
    people: list[dict[str, Any]],
    regular: list[dict[str, Any]],
    awake: list[dict[str, Any]],
    now: datetime,
    story: Story,
) -> None:
    def add(person: dict[str, Any], expires: date, **extra: Any) -> int:
        kind, product, price = rng.choice(PLANS)
        values = {
            "customer_id": person["id"],
            "kind": kind,
            "product": product,
            "price": price,
            "currency": _currency(person),
            "started_on": expires - timedelta(days=365),
            "expires_on": expires,
        }
        values.update(extra)
        return insert(conn, "subscriptions", **values)

    # Due now: the 30-, 7- and 1-day reminders, two of each.
    due_now = []
    for days in (30, 30, 7, 7, 1, 1):
        person = rng.choice(regular)
        due_now.append(add(person, anchor_day(now, person["timezone"]) + timedelta(days=days)))
    # The one who renews between the scan and the send (the check cancels the reminder).
    person = rng.choice(awake)
    story.renews = add(person, anchor_day(now, person["timezone"]) + timedelta(days=7))
    # Everyone else: a term ending some time in the next year; some renewed early, a few canceled.
    for person in _pick(rng, people[4:], len(people) // 3):
        today = local_today(now, person["timezone"])
        if rng.random() < 0.15:
            renewed = today - timedelta(days=rng.randrange(1, 20))
            add(person, today + timedelta(days=rng.randrange(330, 365)), renewed_on=renewed)
        elif rng.random() < 0.05:
            add(person, today + timedelta(days=rng.randrange(2, 60)), status="canceled")
        else:
            add(person, today + timedelta(days=rng.randrange(2, 365)))


def _prescriptions(
    conn: sqlite3.Connection,
    rng: random.Random,
    people: list[dict[str, Any]],
    regular: list[dict[str, Any]],
    awake: list[dict[str, Any]],
    now: datetime,
    story: Story,
) -> None:
    def add(person: dict[str, Any], runs_out: date, supply: int, refills: int = 3) -> int:
        return insert(
            conn,
            "prescriptions",
            customer_id=person["id"],
            drug_name=rng.choice(DRUGS),
            days_supply=supply,
            last_filled_on=runs_out - timedelta(days=supply),
            refills_left=refills,
        )

    def due_now(person: dict[str, Any]) -> int:
        runs_out = anchor_day(now, person["timezone"]) + timedelta(days=3)
        return add(person, runs_out, rng.choice((30, 90)))

    for person in _pick(rng, regular, 4):
        due_now(person)
    due_now(people[2])  # the invalid number: the text cannot go, the email does
    story.refills = due_now(rng.choice(awake))
    for person in _pick(rng, people[4:], len(people) // 4):
        today = local_today(now, person["timezone"])
        supply = rng.choice((30, 30, 90))
        if rng.random() < 0.1:
            # Refilled early, a few days before the last supply would have run out.
            add(
                person, today - timedelta(days=rng.randrange(0, 4)) + timedelta(days=supply), supply
            )
        elif rng.random() < 0.1:
            add(person, today + timedelta(days=rng.randrange(4, supply)), supply, refills=0)
        else:
            add(person, today + timedelta(days=rng.randrange(4, supply)), supply)


def _bills(
    conn: sqlite3.Connection,
    rng: random.Random,
    people: list[dict[str, Any]],
    regular: list[dict[str, Any]],
    awake: list[dict[str, Any]],
    now: datetime,
    story: Story,
) -> None:
    def add(person: dict[str, Any], due: date, paid: date | None = None) -> int:
        amount = Decimal(rng.randrange(2500, 250000)) / 100
        return insert(
            conn,
            "bills",
            customer_id=person["id"],
            account=f"Harbor Card ending {rng.randrange(1000, 10000)}",
            amount=amount,
            currency=_currency(person),
            due_on=due,
            paid_on=paid,
        )

    # Due now: 5 days before, on the day, 3 days overdue; and a paid one that would be due today.
    for days in (5, 5, 0, 0, -3, -3):
        person = rng.choice(regular)
        add(person, anchor_day(now, person["timezone"]) + timedelta(days=days))
    person = rng.choice(regular)
    today = local_today(now, person["timezone"])
    add(person, anchor_day(now, person["timezone"]), paid=today - timedelta(days=2))
    add(people[3], anchor_day(now, people[3]["timezone"]))  # no phone, no email: fails visibly
    person = rng.choice(awake)
    story.pays = add(person, anchor_day(now, person["timezone"]))
    for person in _pick(rng, people[4:], int(len(people) * 0.4)):
        today = local_today(now, person["timezone"])
        due = today + timedelta(days=rng.randrange(-2, 28))
        paid = None
        if rng.random() < 0.35:
            paid = min(today, due) - timedelta(days=rng.randrange(0, 3))
        add(person, due, paid)


def _orders(
    conn: sqlite3.Connection,
    rng: random.Random,
    people: list[dict[str, Any]],
    regular: list[dict[str, Any]],
    awake: list[dict[str, Any]],
    now: datetime,
    story: Story,
) -> None:
    by_sku = {p[0]: p for p in PRODUCTS}
    owned: dict[int, set[str]] = {}

    def add(person: dict[str, Any], sku: str, placed: datetime, **extra: Any) -> int:
        _, title, kind, price = by_sku[sku]
        values: dict[str, Any] = {
            "customer_id": person["id"],
            "sku": sku,
            "title": title,
            "amount": price,
            "currency": _currency(person),
            "placed_at": placed,
        }
        if kind == "digital":
            values["delivered_on"] = placed.date()
        else:
            delivered = placed.date() + timedelta(days=rng.randrange(2, 6))
            if delivered < local_today(now, person["timezone"]):
                values["delivered_on"] = delivered
        values.update(extra)
        owned.setdefault(person["id"], set()).add(sku)
        return insert(conn, "orders", **values)

    def placed_on(day: date, person: dict[str, Any]) -> datetime:
        zone = ZoneInfo(person["timezone"] or DEFAULT_ZONE)
        clock = time(rng.randrange(8, 21), rng.randrange(60))
        return datetime.combine(day, clock, zone).astimezone(UTC)

    physical = [p[0] for p in PRODUCTS if p[2] == "physical"]

    # The past six months of ordinary orders, none of them a duplicate.
    for person in _pick(rng, people[4:], int(len(people) * 0.6)):
        for sku in rng.sample([p[0] for p in PRODUCTS], rng.randrange(1, 4)):
            placed = now - timedelta(days=rng.randrange(8, 180), minutes=rng.randrange(1440))
            add(person, sku, placed)

    # Delivered four days ago: the follow-up is due now.
    follow_ups = []
    for person in _pick(rng, regular, 5):
        delivered = anchor_day(now, person["timezone"]) - timedelta(days=4)
        sku = rng.choice([s for s in physical if s not in owned.get(person["id"], ())])
        placed = placed_on(delivered - timedelta(days=3), person)
        follow_ups.append(add(person, sku, placed, delivered_on=delivered))
    # Delivered four days ago, but the customer already called: no follow-up.
    person = rng.choice(regular)
    delivered = anchor_day(now, person["timezone"]) - timedelta(days=4)
    placed = placed_on(delivered - timedelta(days=2), person)
    order = add(person, "HW-4003", placed, delivered_on=delivered)
    insert(
        conn,
        "support_tickets",
        customer_id=person["id"],
        order_id=order,
        subject="The basket rattles",
        opened_at=placed_on(delivered + timedelta(days=1), person),
    )
    # The one who calls support between the scan and the send.
    person = rng.choice(awake)
    delivered = anchor_day(now, person["timezone"]) - timedelta(days=4)
    placed = placed_on(delivered - timedelta(days=3), person)
    story.calls_support = add(person, "HW-4006", placed, delivered_on=delivered)

    # Fresh orders, placed in the last hours, of something bought before.
    def again(sku: str, first_days_ago: int) -> int:
        person = rng.choice([p for p in regular if sku not in owned.get(p["id"], ())])
        add(person, sku, now - timedelta(days=first_days_ago, hours=rng.randrange(1, 8)))
        return add(person, sku, now - timedelta(minutes=rng.randrange(15, 300)))

    story.duplicates = [
        again("EB-1001", 400),  # digital, long ago: still a duplicate
        again("SW-2001", 35),  # digital
        again("HW-4002", 12),  # physical, within the window
        again("HW-4001", 20),  # physical, within the window
    ]
    story.not_duplicates = [
        again("HW-4009", DUPLICATE_WINDOW_DAYS + 200),  # physical, long ago: a replacement
        again("CN-5001", 14),  # coffee beans: bought again on purpose
    ]

    # The checkout: someone who owns the video course asks to buy it again; someone else who has
    # never bought the skillet asks to buy it.
    person = rng.choice([p for p in regular if "VC-3001" not in owned.get(p["id"], ())])
    add(person, "VC-3001", now - timedelta(days=75, hours=3))
    story.checkout_owned = (person["id"], "VC-3001")
    person = rng.choice([p for p in regular if "HW-4004" not in owned.get(p["id"], ())])
    story.checkout_new = (person["id"], "HW-4004")


# --- between the scan and the send --------------------------------------------------------------


def meanwhile(path: str | Path, story: Story, now: datetime) -> list[str]:
    """Customers act after the scan: one renews, one refills early, one pays, one calls support.

    Their reminders are already scheduled; each rule's ``check`` cancels them at send time.
    Returns one line per act, for the demo to print.
    """
    conn = sqlite3.connect(path)
    done: list[str] = []
    try:
        with conn:
            row = conn.execute(
                "SELECT s.product, s.kind, s.expires_on, c.first_name, c.timezone "
                "FROM subscriptions s JOIN customers c ON c.id = s.customer_id WHERE s.id = ?",
                (story.renews,),
            ).fetchone()
            if row:
                new_end = date.fromisoformat(row[2]) + timedelta(days=365)
                today = local_today(now, row[4])
                conn.execute(
                    "UPDATE subscriptions SET expires_on = ?, renewed_on = ? WHERE id = ?",
                    (new_end.isoformat(), today.isoformat(), story.renews),
                )
                what = f"the {row[0]} warranty" if row[1] == "warranty" else row[0]
                done.append(f"{row[3]} renewed {what} (subscription {story.renews})")
            row = conn.execute(
                "SELECT rx.drug_name, c.first_name, c.timezone FROM prescriptions rx "
                "JOIN customers c ON c.id = rx.customer_id WHERE rx.id = ?",
                (story.refills,),
            ).fetchone()
            if row:
                conn.execute(
                    "UPDATE prescriptions SET last_filled_on = ?, refills_left = refills_left - 1 "
                    "WHERE id = ?",
                    (local_today(now, row[2]).isoformat(), story.refills),
                )
                done.append(f"{row[1]} picked up {row[0]} early (prescription {story.refills})")
            row = conn.execute(
                "SELECT b.account, c.first_name, c.timezone FROM bills b "
                "JOIN customers c ON c.id = b.customer_id WHERE b.id = ?",
                (story.pays,),
            ).fetchone()
            if row:
                conn.execute(
                    "UPDATE bills SET paid_on = ? WHERE id = ?",
                    (local_today(now, row[2]).isoformat(), story.pays),
                )
                done.append(f"{row[1]} paid the {row[0]} statement (bill {story.pays})")
            row = conn.execute(
                "SELECT o.customer_id, o.title, c.first_name FROM orders o "
                "JOIN customers c ON c.id = o.customer_id WHERE o.id = ?",
                (story.calls_support,),
            ).fetchone()
            if row:
                insert(
                    conn,
                    "support_tickets",
                    customer_id=row[0],
                    order_id=story.calls_support,
                    subject=f"Question about my {row[1].lower()}",
                    opened_at=now - timedelta(minutes=5),
                )
                done.append(
                    f"{row[2]} called support about the {row[1].lower()} "
                    f"(order {story.calls_support})"
                )
    finally:
        conn.close()
    return done
