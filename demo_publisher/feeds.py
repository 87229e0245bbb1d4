"""The demo's data: feeds whose values move the way real ones do.

Every feed owns one key (its ``type``) and produces the ``values`` of its next
message from the time of that message.  Values follow bounded, mean-reverting
random walks (Ornstein-Uhlenbeck steps scaled by the time since the feed's last
message, so the motion looks the same at 1 msg/s and at 10 000 msg/s) on top of
deterministic shapes: a daily cycle in each city's local time, the season by
latitude, rush hours for NO2, an afternoon peak for ozone, office hours for
electricity.  The moon is not random at all: its phase is computed from the date.

``catalog(n)`` lists the first ``n`` feeds in an order that mixes the kinds, so a
small ``--keys`` still shows a bit of everything; beyond the named cities the
catalog continues with numbered sensors, so any ``--keys`` works.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import count
from typing import Any

SYNODIC_DAYS = 29.530588853
# A well-known new moon (2000-01-06 18:14 UTC), the epoch of the phase computation.
_NEW_MOON_EPOCH = datetime(2000, 1, 6, 18, 14, tzinfo=UTC)

# Time steps longer than this are treated as this long: after a pause the walks
# land somewhere plausible instead of jumping across their whole range.
_MAX_STEP_S = 3600.0


class Walk:
    """A bounded random walk pulled back toward its mean (Ornstein-Uhlenbeck).

    ``sigma`` is the typical drift over one hour; ``revert_h`` how many hours a
    deviation takes to fade.  Clamping keeps the value inside [lo, hi].
    """

    __slots__ = ("hi", "lo", "mean", "revert_h", "rng", "sigma", "x")

    def __init__(
        self,
        rng: random.Random,
        mean: float,
        sigma: float,
        lo: float,
        hi: float,
        revert_h: float = 2.0,
    ) -> None:
        self.rng = rng
        self.mean = mean
        self.sigma = sigma
        self.lo = lo
        self.hi = hi
        self.revert_h = revert_h
        # Start somewhere in the walk's usual range, not always at the mean.
        self.x = min(hi, max(lo, rng.gauss(mean, sigma * math.sqrt(revert_h / 2))))

    def step(self, dt_s: float) -> float:
        dt_h = min(dt_s, _MAX_STEP_S) / 3600.0
        if dt_h > 0:
            pull = (self.mean - self.x) * min(1.0, dt_h / self.revert_h)
            self.x += pull + self.sigma * math.sqrt(dt_h) * self.rng.gauss(0.0, 1.0)
            self.x = min(self.hi, max(self.lo, self.x))
        return self.x


def _daily(local_hour: float, peak_hour: float) -> float:
    """A daily cycle in [-1, 1] that peaks at ``peak_hour`` local time."""
    return math.cos(2 * math.pi * (local_hour - peak_hour) / 24)


def _bump(local_hour: float, center: float, width: float) -> float:
    """A bump in [0, 1] around ``center`` o'clock (wrapping at midnight)."""
    d = (local_hour - center + 12) % 24 - 12
    return math.exp(-((d / width) ** 2))


def _local_hour(now: datetime, utc_offset_h: float) -> float:
    t = now.hour + now.minute / 60 + now.second / 3600 + utc_offset_h
    return t % 24


class Feed:
    """One key of the demo: its type, how long a value stays valid, and its values."""

    horizon_s = 60.0

    def __init__(self, type_: str) -> None:
        self.type = type_
        self._last: datetime | None = None

    def _dt(self, now: datetime) -> float:
        """Seconds since this feed's previous message (0 for the first)."""
        dt = 0.0 if self._last is None else max(0.0, (now - self._last).total_seconds())
        self._last = now
        return dt

    def values(self, now: datetime) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class City:
    name: str
    slug: str
    lat: float
    utc_offset_h: float
    mean_c: float
    """Annual mean temperature."""
    day_amp_c: float
    """Half the usual day-night temperature difference."""
    humidity: float
    pm25: float
    """Typical PM2.5 in ug/m3."""


CITIES: tuple[City, ...] = (
    City("Paris", "paris", 48.9, 1, 12.5, 4.5, 72, 13),
    City("Tokyo", "tokyo", 35.7, 9, 16.0, 4.0, 65, 11),
    City("New York", "new-york", 40.7, -5, 13.0, 4.5, 63, 9),
    City("Sydney", "sydney", -33.9, 10, 18.5, 4.0, 65, 7),
    City("Delhi", "delhi", 28.6, 5.5, 25.0, 6.5, 55, 95),
    City("Nairobi", "nairobi", -1.3, 3, 18.0, 6.0, 70, 22),
    City("Reykjavik", "reykjavik", 64.1, 0, 5.0, 2.5, 78, 5),
    City("Sao Paulo", "sao-paulo", -23.6, -3, 19.5, 5.0, 76, 17),
    City("Cairo", "cairo", 30.0, 2, 22.5, 7.0, 50, 70),
    City("Singapore", "singapore", 1.35, 8, 27.5, 3.5, 82, 16),
    City("Berlin", "berlin", 52.5, 1, 10.0, 4.5, 74, 14),
    City("Mexico City", "mexico-city", 19.4, -6, 17.0, 7.0, 55, 24),
    City("Moscow", "moscow", 55.8, 3, 6.0, 4.0, 75, 12),
    City("Cape Town", "cape-town", -33.9, 2, 17.0, 5.0, 70, 10),
    City("Vancouver", "vancouver", 49.3, -8, 11.0, 4.0, 78, 6),
    City("Mumbai", "mumbai", 19.1, 5.5, 27.0, 4.0, 75, 45),
    City("Lima", "lima", -12.0, -5, 19.5, 3.5, 82, 25),
    City("Oslo", "oslo", 59.9, 1, 6.5, 4.0, 75, 7),
    City("Beijing", "beijing", 39.9, 8, 13.0, 6.0, 55, 40),
    City("Dubai", "dubai", 25.2, 4, 28.0, 6.0, 55, 45),
)

_COMPASS = ("N", "NE", "E", "SE", "S", "SW", "W", "NW")


def _season(now: datetime, lat: float) -> float:
    """Seasonal offset in degrees C: warmest in late July north, late January south."""
    doy = now.timetuple().tm_yday
    amplitude = min(abs(lat), 60.0) / 60.0 * 11.0
    shape = math.cos(2 * math.pi * (doy - 200) / 365.25)
    return amplitude * shape * (1 if lat >= 0 else -1)


class Weather(Feed):
    horizon_s = 120.0

    def __init__(self, city: City, rng: random.Random) -> None:
        super().__init__(f"weather:{city.slug}")
        self.city = city
        self.anomaly = Walk(rng, 0.0, 1.2, -8.0, 8.0, revert_h=12)
        self.humidity = Walk(rng, 0.0, 6.0, -35.0, 35.0, revert_h=6)
        self.pressure = Walk(rng, 1013.0, 2.5, 965.0, 1045.0, revert_h=48)
        self.wind = Walk(rng, 14.0, 6.0, 0.0, 95.0, revert_h=4)
        self.wind_dir = rng.uniform(0, 360)
        self.cloud = Walk(rng, 45.0, 25.0, 0.0, 100.0, revert_h=5)
        self.rng = rng

    def values(self, now: datetime) -> dict[str, Any]:
        dt = self._dt(now)
        c = self.city
        hour = _local_hour(now, c.utc_offset_h)
        day = _daily(hour, 15.0)
        cloud = self.cloud.step(dt)
        # Clouds flatten the daily cycle: cooler afternoons, milder nights.
        temp = c.mean_c + _season(now, c.lat) + c.day_amp_c * day * (1 - cloud / 200)
        temp += self.anomaly.step(dt)
        humidity = min(100.0, max(8.0, c.humidity - 14 * day + self.humidity.step(dt)))
        wind = self.wind.step(dt)
        self.wind_dir = (self.wind_dir + self.rng.gauss(0, 25) * math.sqrt(min(dt, 3600) / 3600))
        self.wind_dir %= 360
        pressure = self.pressure.step(dt)
        if cloud < 20:
            conditions = "clear"
        elif cloud < 55:
            conditions = "partly cloudy"
        elif cloud < 80 or humidity < 75 or pressure > 1020:
            conditions = "cloudy"
        elif temp < 0.5:
            conditions = "snow"
        else:
            conditions = "rain" if wind < 45 else "storm"
        return {
            "city": c.name,
            "temperature_c": round(temp, 1),
            "humidity_pct": round(humidity),
            "pressure_hpa": round(pressure, 1),
            "wind_kph": round(wind, 1),
            "wind_dir": _COMPASS[int((self.wind_dir + 22.5) // 45) % 8],
            "cloud_pct": round(cloud),
            "conditions": conditions,
        }


# US EPA PM2.5 breakpoints (ug/m3, 24 h) -> AQI, and the category names.
_AQI_PM25: tuple[tuple[float, float, int, int, str], ...] = (
    (0.0, 9.0, 0, 50, "good"),
    (9.1, 35.4, 51, 100, "moderate"),
    (35.5, 55.4, 101, 150, "unhealthy for sensitive groups"),
    (55.5, 125.4, 151, 200, "unhealthy"),
    (125.5, 225.4, 201, 300, "very unhealthy"),
    (225.5, 500.0, 301, 500, "hazardous"),
)


def aqi_pm25(pm25: float) -> tuple[int, str]:
    """The US AQI and its category for a PM2.5 concentration."""
    c = math.floor(max(0.0, pm25) * 10) / 10
    for c_lo, c_hi, i_lo, i_hi, name in _AQI_PM25:
        if c <= c_hi:
            return round((i_hi - i_lo) / (c_hi - c_lo) * (max(c, c_lo) - c_lo) + i_lo), name
    return 500, "hazardous"


class AirQuality(Feed):
    horizon_s = 300.0

    def __init__(self, city: City, rng: random.Random) -> None:
        super().__init__(f"air:{city.slug}")
        self.city = city
        # Pollution is log-normal-ish: walk the log of a factor around the city's level.
        self.level = Walk(rng, 0.0, 0.25, -1.2, 1.4, revert_h=10)
        self.coarse = Walk(rng, 1.7, 0.15, 1.2, 2.6, revert_h=6)
        self.no2 = Walk(rng, 0.0, 0.2, -0.8, 0.9, revert_h=3)
        self.o3 = Walk(rng, 0.0, 0.15, -0.6, 0.6, revert_h=4)

    def values(self, now: datetime) -> dict[str, Any]:
        dt = self._dt(now)
        hour = _local_hour(now, self.city.utc_offset_h)
        traffic = _bump(hour, 8.5, 2.0) + 0.8 * _bump(hour, 18.5, 2.5)
        pm25 = self.city.pm25 * math.exp(self.level.step(dt)) * (0.85 + 0.3 * traffic)
        pm10 = pm25 * self.coarse.step(dt)
        no2 = (8 + self.city.pm25 * 0.9) * (0.5 + traffic) * math.exp(self.no2.step(dt))
        o3 = 35 + 45 * max(0.0, _daily(hour, 15.0)) * math.exp(self.o3.step(dt)) - 0.2 * no2
        aqi, category = aqi_pm25(pm25)
        return {
            "city": self.city.name,
            "aqi": aqi,
            "category": category,
            "pm2_5_ugm3": round(pm25, 1),
            "pm10_ugm3": round(pm10, 1),
            "no2_ugm3": round(no2, 1),
            "o3_ugm3": round(max(2.0, o3), 1),
        }


_PHASES = (
    "new moon",
    "waxing crescent",
    "first quarter",
    "waxing gibbous",
    "full moon",
    "waning gibbous",
    "last quarter",
    "waning crescent",
)


def moon_phase(now: datetime) -> dict[str, Any]:
    """The moon's phase at ``now`` from the mean synodic month (good to a few hours)."""
    days = (now - _NEW_MOON_EPOCH).total_seconds() / 86400
    age = days % SYNODIC_DAYS
    fraction = age / SYNODIC_DAYS
    illumination = (1 - math.cos(2 * math.pi * fraction)) / 2
    name = _PHASES[int((fraction * 8 + 0.5) % 8)]
    to_full = (SYNODIC_DAYS / 2 - age) % SYNODIC_DAYS
    to_new = SYNODIC_DAYS - age
    return {
        "phase": name,
        "illumination_pct": round(illumination * 100, 1),
        "age_days": round(age, 2),
        "waxing": fraction < 0.5,
        "next_full": _day(now + timedelta(days=to_full)),
        "next_new": _day(now + timedelta(days=to_new)),
    }


def _day(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")


class Moon(Feed):
    horizon_s = 600.0

    def __init__(self) -> None:
        super().__init__("moon")

    def values(self, now: datetime) -> dict[str, Any]:
        return moon_phase(now)


class Sensor(Feed):
    """A building's sensor: type ``sensor:<name>``, a short horizon, its generator."""

    horizon_s = 30.0

    def __init__(self, name: str, rng: random.Random) -> None:
        super().__init__(f"sensor:{name}")
        self.rng = rng


class Boiler(Sensor):
    """A heating boiler: the burner cycles on and off around its set-point."""

    def __init__(self, name: str, rng: random.Random) -> None:
        super().__init__(name, rng)
        self.setpoint = rng.choice((65.0, 70.0, 75.0))
        self.temp = self.setpoint + rng.uniform(-4, 4)
        self.burner = rng.random() < 0.5
        self.pressure = Walk(rng, 1.6, 0.15, 0.8, 3.2, revert_h=2)

    def values(self, now: datetime) -> dict[str, Any]:
        dt = min(self._dt(now), 600.0)
        # Heats at ~0.6 C/min with the burner on, cools at ~0.3 C/min without.
        self.temp += (0.6 if self.burner else -0.3) * dt / 60 + self.rng.gauss(0, 0.05)
        if self.temp > self.setpoint + 4:
            self.burner = False
        elif self.temp < self.setpoint - 4:
            self.burner = True
        pressure = self.pressure.step(dt) + (self.temp - self.setpoint) * 0.01
        status = "ok" if 1.0 <= pressure <= 2.5 else "check pressure"
        return {
            "temperature_c": round(self.temp, 1),
            "setpoint_c": self.setpoint,
            "pressure_bar": round(pressure, 2),
            "burner": self.burner,
            "status": status,
        }


class Pump(Sensor):
    """A centrifugal pump: flow follows speed, vibration has rare spikes."""

    def __init__(self, name: str, rng: random.Random) -> None:
        super().__init__(name, rng)
        self.rpm = Walk(rng, rng.choice((1450.0, 2900.0)), 60.0, 0.0, 3200.0, revert_h=1)
        self.vibration = Walk(rng, 2.2, 0.6, 0.4, 12.0, revert_h=1)
        self.spike = 0.0

    def values(self, now: datetime) -> dict[str, Any]:
        dt = self._dt(now)
        rpm = self.rpm.step(dt)
        if self.rng.random() < min(0.5, dt / 1800):  # about one spike per half hour
            self.spike = self.rng.uniform(2.0, 6.0)
        self.spike *= math.exp(-dt / 30)
        vibration = self.vibration.step(dt) + self.spike
        if vibration > 7.1:
            status = "alarm"
        elif vibration > 4.5:
            status = "warning"
        else:
            status = "ok"
        return {
            "speed_rpm": round(rpm),
            "flow_lpm": round(rpm * 0.16 + self.rng.gauss(0, 2), 1),
            "vibration_mm_s": round(vibration, 2),
            "status": status,
        }


class PowerMeter(Sensor):
    """A building's electricity meter: office hours, grid voltage, a running total."""

    def __init__(self, name: str, rng: random.Random, utc_offset_h: float = 1.0) -> None:
        super().__init__(name, rng)
        self.utc_offset_h = utc_offset_h
        self.base_kw = rng.uniform(20, 120)
        self.noise = Walk(rng, 0.0, 0.08, -0.3, 0.3, revert_h=0.5)
        self.voltage = Walk(rng, 230.0, 2.0, 216.0, 244.0, revert_h=0.5)
        self.energy_kwh = round(rng.uniform(1e4, 5e5), 1)

    def values(self, now: datetime) -> dict[str, Any]:
        dt = self._dt(now)
        hour = _local_hour(now, self.utc_offset_h)
        office = _bump(hour, 13.0, 4.5) if now.weekday() < 5 else 0.15
        power = self.base_kw * (0.3 + 0.7 * office) * (1 + self.noise.step(dt))
        self.energy_kwh += power * dt / 3600
        return {
            "power_kw": round(power, 1),
            "voltage_v": round(self.voltage.step(dt), 1),
            "energy_kwh": round(self.energy_kwh, 1),
        }


class Room(Sensor):
    """A meeting room: CO2 rises while people are in, temperature follows."""

    def __init__(self, name: str, rng: random.Random, utc_offset_h: float = 1.0) -> None:
        super().__init__(name, rng)
        self.utc_offset_h = utc_offset_h
        self.people = 0
        self.co2 = rng.uniform(420, 700)
        self.temp = Walk(rng, 21.5, 0.6, 17.0, 27.0, revert_h=2)

    def values(self, now: datetime) -> dict[str, Any]:
        dt = self._dt(now)
        hour = _local_hour(now, self.utc_offset_h)
        busy = _bump(hour, 11.0, 2.0) + _bump(hour, 15.0, 2.0) if now.weekday() < 5 else 0.0
        if self.rng.random() < min(1.0, dt / 120):  # people come and go every few minutes
            # Spread grows with the crowd: empty at night, 4-12 people at the busy hours.
            self.people = max(0, min(12, round(self.rng.gauss(busy * 8, 0.4 + 2 * busy))))
        # Each person adds CO2; ventilation pulls the room back toward outdoor air.
        target = 420 + self.people * 95
        self.co2 += (target - self.co2) * min(1.0, dt / 900) + self.rng.gauss(0, 3)
        return {
            "occupancy": self.people,
            "occupied": self.people > 0,
            "co2_ppm": round(self.co2),
            "temperature_c": round(self.temp.step(dt) + self.people * 0.15, 1),
        }


SensorFactory = Callable[[str, random.Random], Feed]


_SENSORS: tuple[tuple[str, SensorFactory], ...] = (
    ("boiler", Boiler),
    ("pump", Pump),
    ("meter", PowerMeter),
    ("room", Room),
)

FeedFactory = Callable[[random.Random], Feed]


def _moon(rng: random.Random) -> Feed:
    return Moon()


def _order() -> Iterator[tuple[str, FeedFactory]]:
    """Every feed's type and constructor, kinds interleaved, without end."""
    yield "moon", _moon
    numbers = dict.fromkeys((kind for kind, _ in _SENSORS), 0)
    for i in count():
        if i < len(CITIES):
            city = CITIES[i]
            yield f"weather:{city.slug}", partial(Weather, city)
            yield f"air:{city.slug}", partial(AirQuality, city)
        kind, factory = _SENSORS[i % len(_SENSORS)]
        numbers[kind] += 1
        name = f"{kind}-{numbers[kind]:02d}"
        yield f"sensor:{name}", partial(factory, name)


# Feeds beyond this many share one generator: a Mersenne Twister holds ~5 KB of
# state, which is 500 MB at 100 000 keys; the shared one costs nothing per key.
OWN_GENERATORS = 1000


def catalog(n: int, seed: int | str | None = None) -> list[Feed]:
    """The first ``n`` feeds.  With a seed, the same seed gives the same values.

    The first ``OWN_GENERATORS`` feeds each draw from their own generator seeded by
    (seed, type), so they move the same way whatever ``n`` is; the rest share one.
    """
    base = random.randrange(2**32) if seed is None else seed
    shared = random.Random(f"{base}:shared")
    feeds: list[Feed] = []
    for type_, make in _order():
        if len(feeds) >= n:
            break
        own = len(feeds) < OWN_GENERATORS
        feeds.append(make(random.Random(f"{base}:{type_}") if own else shared))
    return feeds
