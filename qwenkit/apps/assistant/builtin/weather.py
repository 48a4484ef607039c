"""Weather from Open-Meteo's forecast API: now and the next days at a named place."""

from __future__ import annotations

from typing import Any

from qwenkit.apps.assistant.builtin.geo import Geocoder
from qwenkit.apps.assistant.services import Service
from qwenkit.apps.assistant.tool import Tool, ToolError

# WMO weather interpretation codes, as Open-Meteo documents them.
WMO = {0: "clear sky", 1: "mainly clear", 2: "partly cloudy", 3: "overcast", 45: "fog", 48: "rime fog",
       51: "light drizzle", 53: "drizzle", 55: "dense drizzle", 56: "freezing drizzle", 57: "freezing drizzle",
       61: "light rain", 63: "rain", 65: "heavy rain", 66: "freezing rain", 67: "freezing rain",
       71: "light snow", 73: "snow", 75: "heavy snow", 77: "snow grains", 80: "light showers", 81: "showers",
       82: "violent showers", 85: "snow showers", 86: "heavy snow showers", 95: "thunderstorm",
       96: "thunderstorm with hail", 99: "thunderstorm with heavy hail"}


def weather_tool(meteo: Service, geocoder: Geocoder) -> Tool:
    def run(args: dict[str, Any]) -> str:
        place = geocoder.locate(args["location"])
        days = int(args.get("days", 3))
        data = meteo.get_json("/v1/forecast", {
            "latitude": place.lat, "longitude": place.lon, "timezone": "auto", "forecast_days": days,
            "current": "temperature_2m,weather_code,wind_speed_10m,precipitation",
            "daily": "weather_code,temperature_2m_max,temperature_2m_min,precipitation_sum",
        }, key_param="apikey")
        try:
            now = data["current"]
            daily = data["daily"]
            lines = [f"Weather in {place.name} now: {now['temperature_2m']} °C, "
                     f"{WMO.get(now.get('weather_code'), 'unknown conditions')}, wind {now['wind_speed_10m']} km/h."]
            for i, day in enumerate(daily["time"]):
                lines.append(f"{day}: {WMO.get(daily['weather_code'][i], 'unknown')}, "
                             f"{daily['temperature_2m_min'][i]} to {daily['temperature_2m_max'][i]} °C, "
                             f"precipitation {daily['precipitation_sum'][i]} mm")
        except (KeyError, TypeError, IndexError) as e:
            raise ToolError(f"{meteo.label} answered without the expected forecast fields ({e!r})") from None
        return "\n".join(lines)

    return Tool(
        name="get_weather",
        use_when="the user asks about weather, temperature, rain or snow",
        description="Current weather and the forecast for the next days at a place.",
        parameters={
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "a city or place name"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7, "description": "days of forecast"},
            },
            "required": ["location"],
        },
        run=run,
    )
