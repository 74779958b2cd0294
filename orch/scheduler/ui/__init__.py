"""The web dashboard at /ui: server-rendered pages, a little JavaScript, live by Server-Sent Events.

``session`` signs sessions, CSRF tokens and one-time links (pure); ``pages`` renders HTML, escaping everything
users wrote; ``views`` serves the pages and the event stream. Actions from the pages go to the JSON API itself
(the session cookie with its CSRF header is a credential there), so a button does what the CLI does.
"""
