-- The last time each user viewed, carted, removed and bought each product:
-- what the recommender personalises from (serving.user_product_state).
-- Keyed by user, so dashboards may not read it. Its keys and measures are
-- a contract of DESIGN.md.
-- readers: recommender
SELECT e.user_id AS user_id,
       e.product_id AS product_id,
       max(e.event_time) FILTER (WHERE e.event_type = 'page_view') AS last_viewed_at,
       max(e.event_time) FILTER (WHERE e.event_type = 'add_to_cart') AS last_carted_at,
       max(e.event_time) FILTER (WHERE e.event_type = 'remove_from_cart') AS last_removed_at,
       max(e.event_time) FILTER (WHERE e.event_type = 'purchase') AS last_purchased_at
FROM events AS e
GROUP BY 1, 2
