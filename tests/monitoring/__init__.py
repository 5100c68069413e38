"""Helpers and data of the chart, alert, dashboard and Prometheus tests."""
