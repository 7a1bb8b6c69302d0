"""The pieces of the report's HTML page (prunebench/report/html.py puts them together): markup
helpers, one module per group of sections, the page's stylesheet and scripts as package data
(page.css, error_trap.js, page.js) and the headless-browser driver that checks the page.
"""
