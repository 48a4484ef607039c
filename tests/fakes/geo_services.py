"""Loopback stand-ins for the services behind the assistant's built-in tools, speaking their real APIs.

Each is a real HTTP server on 127.0.0.1 (a thread per server) answering the request shapes the real service takes
with the response shapes it gives:
- Nominatim: GET /search?q=&format=jsonv2&limit=[&viewbox=&bounded=1] -> a JSON list of places (lat/lon as strings).
- OSRM: GET /route/v1/{profile}/{lon},{lat};{lon},{lat}?steps=true -> {"code": "Ok", "routes": [...], "waypoints"}.
- Open-Meteo: GET /v1/forecast?latitude=&longitude=&current=&daily= -> {"current": {...}, "daily": {...}}.
- SearXNG: GET /search?q=&format=json -> {"query", "results": [{"title", "url", "content"}], "answers"}.

Each server records the requests it got (`.requests`) and can be told to misbehave (`.fail = "timeout" | "500" |
"badjson"`), for the tests of broken tools. The small gazetteer is real coordinates of real places.
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# name, aliases, lat, lon, type
GAZETTEER = [
    ("Brandenburger Tor, Pariser Platz, Mitte, Berlin, Deutschland", ("brandenburg gate", "brandenburger tor"),
     52.5162746, 13.3777041, "attraction"),
    ("Alexanderplatz, Mitte, Berlin, Deutschland", ("alexanderplatz", "alex"), 52.5219184, 13.4132147, "square"),
    ("Berlin Hauptbahnhof, Mitte, Berlin, Deutschland", ("berlin hauptbahnhof", "berlin central station"),
     52.5250839, 13.3694381, "station"),
    ("Berlin, Deutschland", ("berlin",), 52.5170365, 13.3888599, "city"),
    ("München, Bayern, Deutschland", ("munich", "münchen", "muenchen"), 48.1371079, 11.5753822, "city"),
    ("Salzburg, Österreich", ("salzburg",), 47.7981346, 13.0464806, "city"),
    ("Wien, Österreich", ("vienna", "wien"), 48.2083537, 16.3725042, "city"),
    ("杭州市, 浙江省, 中国", ("hangzhou", "杭州"), 30.2489634, 120.2052342, "city"),
    ("上海市, 中国", ("shanghai", "上海"), 31.2323437, 121.4691024, "city"),
    ("北京市, 中国", ("beijing", "北京"), 39.9057136, 116.3912972, "city"),
    ("West Lake, 杭州市, 浙江省, 中国", ("west lake", "西湖"), 30.2435297, 120.1498711, "lake"),
    ("渋谷駅, 渋谷区, 東京都, 日本", ("shibuya station", "shibuya"), 35.6580339, 139.7016358, "station"),
    ("Tokyo Station, 千代田区, 東京都, 日本", ("tokyo station",), 35.6812362, 139.7671248, "station"),
    ("東京都, 日本", ("tokyo",), 35.6768601, 139.7638947, "city"),
    ("Matsumoto Kiyoshi, 道玄坂, 渋谷区, 東京都, 日本", ("pharmacy", "drugstore", "matsumoto kiyoshi"),
     35.6590, 139.6990, "pharmacy"),
    ("Paris, Île-de-France, France", ("paris",), 48.8534951, 2.3483915, "city"),
    ("Musée du Louvre, Paris, France", ("louvre", "musée du louvre"), 48.8611473, 2.3380277, "museum"),
    ("Eiffel Tower, Paris, France", ("eiffel tower", "tour eiffel"), 48.8582599, 2.2945006, "attraction"),
    ("London, England, United Kingdom", ("london",), 51.5074456, -0.1277653, "city"),
    ("Heathrow Airport, London, United Kingdom", ("heathrow",), 51.4680, -0.4551, "aerodrome"),
    ("Amsterdam, Nederland", ("amsterdam",), 52.3730796, 4.8924534, "city"),
    ("Rotterdam, Nederland", ("rotterdam",), 51.9244424, 4.47775, "city"),
    ("San Francisco, California, United States", ("san francisco", "sf"), 37.7792588, -122.4193286, "city"),
    ("Golden Gate Bridge, San Francisco, United States", ("golden gate bridge",), 37.8199109, -122.4785598,
     "bridge"),
    ("Oakland, California, United States", ("oakland",), 37.8044557, -122.271356, "city"),
    ("Seattle, Washington, United States", ("seattle",), 47.6038321, -122.330062, "city"),
    ("New York, United States", ("new york", "nyc"), 40.7127281, -74.0060152, "city"),
    ("Boston, Massachusetts, United States", ("boston",), 42.3554334, -71.060511, "city"),
    ("Zürich, Schweiz", ("zurich", "zürich"), 47.3744489, 8.5410422, "city"),
    ("Genève, Suisse", ("geneva", "genève"), 46.2017559, 6.1466014, "city"),
    # places of the held-out assistant prompts (benchmarks/data/agent_heldout.jsonl)
    ("Times Square, Manhattan, New York, United States", ("times square",), 40.7579747, -73.9855426, "square"),
    ("Central Park, Manhattan, New York, United States", ("central park",), 40.7825547, -73.9655834, "park"),
    ("Starbucks, Broadway, Manhattan, New York, United States", ("coffee", "cafe", "café", "咖啡", "starbucks"),
     40.7590, -73.9845, "cafe"),
    ("Mount Sinai Hospital, Manhattan, New York, United States", ("hospital", "医院", "mount sinai"), 40.7900,
     -73.9526, "hospital"),
    ("Roma, Lazio, Italia", ("rome", "roma"), 41.8933203, 12.4829321, "city"),
    ("Colosseo, Roma, Italia", ("colosseum", "colosseo"), 41.8902102, 12.4922309, "attraction"),
    ("Roma Termini, Roma, Italia", ("roma termini", "termini"), 41.9010, 12.5018, "station"),
    ("Sydney, New South Wales, Australia", ("sydney",), -33.8698439, 151.2082848, "city"),
    ("Sydney Opera House, Sydney, Australia", ("sydney opera house", "opera house"), -33.8567844, 151.2152967,
     "attraction"),
    ("Bondi Beach, Sydney, Australia", ("bondi beach", "bondi"), -33.8914755, 151.2766845, "beach"),
    ("Barcelona, Catalunya, España", ("barcelona",), 41.3828939, 2.1774322, "city"),
    ("Sagrada Família, Barcelona, España", ("sagrada familia", "sagrada família"), 41.4036299, 2.1743558,
     "attraction"),
    ("Madrid, España", ("madrid",), 40.4167047, -3.7035825, "city"),
    ("Toronto, Ontario, Canada", ("toronto",), 43.6534817, -79.3839347, "city"),
    ("EVgo Charging Station, Broadway, Oakland, United States", ("ev charging", "charging station", "charger",
     "充电"), 37.8100, -122.2680, "charging_station"),
    ("香港, 中国", ("hong kong", "香港"), 22.2793278, 114.1628131, "city"),
    ("成都市, 四川省, 中国", ("chengdu", "成都"), 30.6598628, 104.0633717, "city"),
    ("西安市, 陕西省, 中国", ("xi'an", "xian", "西安"), 34.2610458, 108.9423241, "city"),
    ("深圳市, 广东省, 中国", ("shenzhen", "深圳"), 22.5445741, 114.0545429, "city"),
    ("广州市, 广东省, 中国", ("guangzhou", "广州"), 23.1301964, 113.2592945, "city"),
    ("天津市, 中国", ("tianjin", "天津"), 39.0850853, 117.1993482, "city"),
    ("杭州东站, 杭州市, 浙江省, 中国", ("hangzhou east", "杭州东站", "杭州东"), 30.2907, 120.2127, "station"),
    ("灵隐寺, 杭州市, 浙江省, 中国", ("lingyin temple", "lingyin", "灵隐寺", "灵隐"), 30.2424, 120.1010, "temple"),
    ("杭州香格里拉饭店, 北山街, 杭州市, 中国", ("hotel", "酒店", "饭店", "shangri-la"), 30.2605, 120.1497, "hotel"),
    ("故宫博物院, 北京市, 中国", ("forbidden city", "palace museum", "故宫"), 39.9163447, 116.3971546, "museum"),
    ("天安门广场, 北京市, 中国", ("tiananmen square", "tiananmen", "天安门广场", "天安门"), 39.9037, 116.3976, "square"),
    ("全聚德, 前门大街, 北京市, 中国", ("restaurant", "餐厅", "餐馆", "quanjude"), 39.8970, 116.3980, "restaurant"),
    ("外滩, 黄浦区, 上海市, 中国", ("the bund", "bund", "外滩"), 31.2400, 121.4903, "attraction"),
    ("南京东路站, 黄浦区, 上海市, 中国", ("metro", "subway", "地铁", "nanjing east road"), 31.2380, 121.4840,
     "station"),
    ("上海浦东国际机场, 上海市, 中国", ("pudong airport", "pudong", "浦东机场", "浦东"), 31.1443, 121.8083, "aerodrome"),
]

SPEED_KMH = {"driving": 80.0, "car": 80.0, "walking": 5.0, "foot": 5.0, "cycling": 16.0, "bike": 16.0}


def _match(query: str) -> list[tuple]:
    q = " ".join(query.lower().replace(",", " ").split())
    hits = [p for p in GAZETTEER if any(a in q or q in a for a in p[1]) or q in p[0].lower()]
    # the place whose alias matches the longest stretch of the query first ("berlin hauptbahnhof" over "berlin"); a
    # query that is only part of an alias ("sydney" of "sydney opera house") ranks below a full match
    return sorted(hits, key=lambda p: -max((len(a) for a in p[1] if a in q), default=0))


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    r = 6371000.0
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * r * math.asin(math.sqrt(a))


class FakeService:
    """One loopback HTTP server. Subclasses implement answer(path, query) -> (status, JSON-able body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.fail: str | None = None
        self.delay = 0.0
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                url = urlsplit(self.path)  # not urlparse: it would cut OSRM's ";" as path parameters
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                service.requests.append((unquote(url.path), query))
                if service.fail == "timeout" or service.delay:
                    time.sleep(30 if service.fail == "timeout" else service.delay)
                if service.fail == "500":
                    return self._send(500, b'{"error": "internal error"}')
                if service.fail == "badjson":
                    return self._send(200, b"<html>maintenance</html>")
                status, body = service.answer(unquote(url.path), query)
                self._send(status, json.dumps(body, ensure_ascii=False).encode())

            def _send(self, status: int, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path: str, query: dict[str, str]) -> tuple[int, object]:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeNominatim(FakeService):
    def answer(self, path, query):
        if path != "/search" or "q" not in query:
            return 400, {"error": {"code": 400, "message": "Nothing to search for."}}
        hits = _match(query["q"])
        if query.get("bounded") == "1" and "viewbox" in query:
            x1, y1, x2, y2 = (float(v) for v in query["viewbox"].split(","))
            hits = [h for h in hits if min(y1, y2) <= h[2] <= max(y1, y2) and min(x1, x2) <= h[3] <= max(x1, x2)]
        rows = []
        for i, (name, _, lat, lon, kind) in enumerate(hits[: int(query.get("limit", 10))]):
            rows.append({"place_id": 100000 + i, "licence": "Data © OpenStreetMap contributors, ODbL 1.0.",
                         "osm_type": "node", "osm_id": 2000000 + i, "lat": f"{lat:.7f}", "lon": f"{lon:.7f}",
                         "category": "place", "type": kind, "place_rank": 16, "importance": 0.7,
                         "addresstype": kind, "name": name.split(",")[0], "display_name": name,
                         "boundingbox": [f"{lat - 0.01:.7f}", f"{lat + 0.01:.7f}", f"{lon - 0.01:.7f}",
                                         f"{lon + 0.01:.7f}"]})
        return 200, rows


class FakeOSRM(FakeService):
    def answer(self, path, query):
        parts = path.split("/")  # ['', 'route', 'v1', profile, coords]
        if len(parts) != 5 or parts[1] != "route" or parts[3] not in SPEED_KMH:
            return 400, {"code": "InvalidUrl", "message": f"URL string malformed close to position {len(path)}"}
        try:
            (lon1, lat1), (lon2, lat2) = [tuple(float(v) for v in c.split(",")) for c in parts[4].split(";")]
        except ValueError:
            return 400, {"code": "InvalidQuery", "message": "Query string malformed close to position 0"}
        if abs(lon1 - lon2) > 60:  # different continents
            return 400, {"code": "NoRoute", "message": "Impossible route between points"}
        distance = haversine_m(lat1, lon1, lat2, lon2) * 1.3
        duration = distance / (SPEED_KMH[parts[3]] / 3.6)
        share = [0.1, 0.6, 0.3]
        steps = [
            {"name": "Main Street", "distance": distance * share[0], "duration": duration * share[0],
             "maneuver": {"type": "depart", "modifier": "east", "location": [lon1, lat1]}, "mode": parts[3]},
            {"name": "Ring Road", "distance": distance * share[1], "duration": duration * share[1],
             "maneuver": {"type": "turn", "modifier": "left", "location": [lon1, lat1]}, "mode": parts[3]},
            {"name": "Station Road", "distance": distance * share[2], "duration": duration * share[2],
             "maneuver": {"type": "turn", "modifier": "right", "location": [lon2, lat2]}, "mode": parts[3]},
            {"name": "", "distance": 0, "duration": 0,
             "maneuver": {"type": "arrive", "modifier": "left", "location": [lon2, lat2]}, "mode": parts[3]},
        ]
        route = {"distance": round(distance, 1), "duration": round(duration, 1), "weight": round(duration, 1),
                 "weight_name": "routability",
                 "legs": [{"distance": round(distance, 1), "duration": round(duration, 1), "summary": "Ring Road",
                           "steps": steps}]}
        return 200, {"code": "Ok", "routes": [route],
                     "waypoints": [{"name": "Main Street", "location": [lon1, lat1], "distance": 3.2},
                                   {"name": "Station Road", "location": [lon2, lat2], "distance": 4.1}]}


class FakeOpenMeteo(FakeService):
    def answer(self, path, query):
        if path != "/v1/forecast":
            return 404, {"error": True, "reason": "Not Found"}
        try:
            lat, lon = float(query["latitude"]), float(query["longitude"])
        except (KeyError, ValueError):
            return 400, {"error": True, "reason": "Parameter 'latitude' is missing"}
        days = int(query.get("forecast_days", 7))
        base = round(25 - abs(lat) * 0.4, 1)  # warmer towards the equator: deterministic and plausible
        codes = [61, 3, 0, 80, 2, 71, 1]
        return 200, {
            "latitude": lat, "longitude": lon, "generationtime_ms": 0.05, "utc_offset_seconds": 3600,
            "timezone": "Europe/Berlin", "timezone_abbreviation": "CET", "elevation": 120.0,
            "current_units": {"time": "iso8601", "interval": "seconds", "temperature_2m": "°C",
                              "weather_code": "wmo code", "wind_speed_10m": "km/h", "precipitation": "mm"},
            "current": {"time": "2026-11-29T10:00", "interval": 900, "temperature_2m": base,
                        "weather_code": codes[0], "wind_speed_10m": 12.0, "precipitation": 0.4},
            "daily_units": {"time": "iso8601", "weather_code": "wmo code", "temperature_2m_max": "°C",
                            "temperature_2m_min": "°C", "precipitation_sum": "mm"},
            "daily": {"time": [f"2026-11-{29 + i}" if 29 + i <= 30 else f"2026-12-{i - 1:02d}" for i in range(days)],
                      "weather_code": [codes[i % 7] for i in range(days)],
                      "temperature_2m_max": [round(base + 3 + i, 1) for i in range(days)],
                      "temperature_2m_min": [round(base - 4 + i, 1) for i in range(days)],
                      "precipitation_sum": [round(3.2 if codes[i % 7] in (61, 80, 71) else 0.0, 1)
                                            for i in range(days)]},
        }


class FakeSearXNG(FakeService):
    def answer(self, path, query):
        if path != "/search":
            return 404, {"error": "not found"}
        if query.get("format") != "json":
            return 403, {"error": "format not allowed"}
        q = query.get("q", "")
        results = [
            {"url": f"https://example.org/{i}", "title": f"{q} - result {i}", "engine": "duckduckgo",
             "content": f"Information about {q}, source {i}.", "score": 1.0 / i, "category": "general"}
            for i in range(1, 4)
        ]
        if "louvre" in q.lower():
            results.insert(0, {"url": "https://www.louvre.fr/en/visit/hours", "title": "Opening hours | Louvre",
                               "content": "The museum is open from 9 am to 6 pm on Monday, Thursday, Saturday and "
                                          "Sunday, and until 9 pm on Wednesday and Friday. Closed on Tuesdays.",
                               "engine": "bing", "score": 2.0, "category": "general"})
        return 200, {"query": q, "number_of_results": len(results), "results": results, "answers": [],
                     "corrections": [], "infoboxes": [], "suggestions": [], "unresponsive_engines": []}


class FakeServices:
    """All four services, with the URLs the assistant's flags take."""

    def __init__(self) -> None:
        self.nominatim, self.osrm = FakeNominatim(), FakeOSRM()
        self.open_meteo, self.searxng = FakeOpenMeteo(), FakeSearXNG()

    @property
    def urls(self) -> dict[str, str]:
        return {"nominatim": self.nominatim.url, "osrm": self.osrm.url, "open_meteo": self.open_meteo.url,
                "searxng": self.searxng.url}

    def close(self) -> None:
        for s in (self.nominatim, self.osrm, self.open_meteo, self.searxng):
            s.close()
