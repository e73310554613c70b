"""The store layer: the database connection, the migrations and every SQL statement of
sandmill, shared by the server and the workers."""
