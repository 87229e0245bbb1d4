"""The demo's upstream microservice: realistic feeds published on the update channel."""
