"""The web dashboard's static assets (index.html, app.js, app.css), served at / by
sandmill.server.routes.dashboard: plain modern JavaScript, no build step."""
